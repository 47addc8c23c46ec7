"""Ciphertexts a malicious server can craft with public material only (no secret key).

Everything here works on SEAL's byte format through ``he.sealformat``: the
server writes every field of a ciphertext it hands the enclave (level, scale,
polynomial count, residues), so these are exactly the frames it could send.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from heclave.he.context import PublicContext
from heclave.he.rns import limb, shoup
from heclave.he.sealformat import Level, RawCiphertext, parse_ciphertext
from heclave.he.slots import SlotCodec


def levels(ctx: PublicContext) -> tuple[Level, Level]:
    """The top level (fresh encryptions, encrypted weights) and the level a linear layer's output is at."""
    context = ctx.toolkit.context
    top = Level.of(context, context.first_parms_id())
    output = Level.of(context, context.first_context_data().next_context_data().parms_id())
    return top, output


def output_scale(ctx: PublicContext) -> float:
    """The scale of every layer output: a top-level product rescaled by the last top-level prime."""
    top, _ = levels(ctx)
    return ctx.params.scale**2 / top.moduli[-1]


def parse_output(ctx: PublicContext, frame: bytes) -> RawCiphertext:
    """A layer output (or anything at the output level) as residues."""
    return parse_ciphertext(frame, levels(ctx)[1], "layer output", max_size=3)


def polynomial_probe(ctx: PublicContext, polynomials: int, a: np.ndarray, scale: float | None = None) -> bytes:
    """``(0, a[, 0])`` at the output level, for integer coefficients ``a``: its decryption ``a s`` is the
    secret key ``s`` times a polynomial of the server's choosing, exactly (no noise at all)."""
    _, output = levels(ctx)
    q = output.moduli[0]
    tables = limb(q, output.n)
    data = np.zeros((polynomials, len(output.moduli), output.n), dtype=np.uint64)
    tables.reduce(np.asarray(a, dtype=np.int64), out=data[1, 0])
    tables.forward(data[1, 0])
    return RawCiphertext(output, output_scale(ctx) if scale is None else scale, data).to_bytes()


def key_probe(ctx: PublicContext, polynomials: int, scale: float | None = None) -> bytes:
    """``(c0, c1[, c2]) = (0, 1[, 0])`` at the output level: its decryption ``c0 + c1 s`` is the secret key."""
    one = np.zeros(ctx.params.poly_modulus_degree, dtype=np.int64)
    one[0] = 1
    return polynomial_probe(ctx, polynomials, one, scale)


def decrypt_with(ctx: PublicContext, frame: bytes, secret: np.ndarray) -> np.ndarray:
    """The slots of a top-level ciphertext (say, a data owner's input) decrypted with the secret key
    coefficients ``secret``, on the first prime alone (enough for a fresh ciphertext's message)."""
    top, _ = levels(ctx)
    ct = parse_ciphertext(frame, top, "ciphertext", max_size=2)
    q = top.moduli[0]
    tables = limb(q, top.n)
    s = tables.reduce(np.asarray(secret, dtype=np.int64))
    tables.forward(s)
    message = np.array(ct.data[0, 0])
    tables.multiply_accumulate(message, np.ascontiguousarray(ct.data[1, 0]), s, shoup(s, q))
    tables.inverse(message)
    return SlotCodec(top.n).decode(tables.centered(message), ct.scale)


def to_output_level(ctx: PublicContext, frame: bytes, polynomials: int | None = None) -> bytes:
    """A top-level ciphertext (a fresh encryption, an encrypted weight) made to look like a layer output.

    Its last prime is dropped, as SEAL's ``mod_switch_to_next`` does to a CKKS
    ciphertext (the message stays ``m * 2^40`` mod ``q0``), the scale field is
    set to what a layer leaves, and zero polynomials are appended up to
    ``polynomials``: every field is what the enclave expects, only the content
    was never computed by the layer.
    """
    top, output = levels(ctx)
    ct = parse_ciphertext(frame, top, "top-level ciphertext", max_size=3)
    data = ct.data[:, : len(output.moduli)]
    if polynomials is not None and polynomials > len(data):
        data = np.concatenate([data, np.zeros((polynomials - len(data), *data.shape[1:]), dtype=np.uint64)])
    return RawCiphertext(output, output_scale(ctx), np.ascontiguousarray(data)).to_bytes()


def with_scale(ctx: PublicContext, frame: bytes, scale: float) -> bytes:
    """The same residues with another scale field (the server writes it)."""
    ct = parse_output(ctx, frame)
    return RawCiphertext(ct.level, scale, ct.data).to_bytes()


def with_parms_id(ctx: PublicContext, frame: bytes, parms_id: tuple[int, ...]) -> bytes:
    """The same residues claiming to be at another level."""
    ct = parse_output(ctx, frame)
    return RawCiphertext(dataclasses.replace(ct.level, parms_id=parms_id), ct.scale, ct.data).to_bytes()


def with_polynomials(ctx: PublicContext, frame: bytes, count: int) -> bytes:
    """The ciphertext cut to, or padded with random polynomials up to, ``count`` polynomials."""
    ct = parse_output(ctx, frame)
    data = ct.data[:count]
    if count > len(data):
        q = np.array(ct.level.moduli, dtype=np.uint64)[:, None]
        extra = np.random.default_rng().integers(0, 2**62, size=(count - len(data), *data.shape[1:]), dtype=np.uint64)
        data = np.concatenate([data, extra % q])
    return RawCiphertext(ct.level, ct.scale, np.ascontiguousarray(data)).to_bytes()


def with_coefficient_added(
    ctx: PublicContext, frame: bytes, value: int, polynomial: int = 0, position: int = 0
) -> bytes:
    """One residue of one polynomial moved by ``value`` modulo its prime; everything else as it was."""
    ct = parse_output(ctx, frame)
    data = np.array(ct.data)
    q = ct.level.moduli[0]
    data[polynomial, 0, position] = np.uint64((int(data[polynomial, 0, position]) + value) % q)
    return RawCiphertext(ct.level, ct.scale, data).to_bytes()


def times_monomial(ctx: PublicContext, frame: bytes, power: int) -> bytes:
    """The ciphertext multiplied by ``X^power``: no key, no noise and no change of scale needed.

    ``X^(N/2)`` multiplies every slot by ``i`` or ``-i``: it swaps the real and
    imaginary lanes, hence the two queries a batch packs into one ciphertext.
    """
    ct = parse_output(ctx, frame)
    q = ct.level.moduli[0]
    tables = limb(q, ct.level.n)
    monomial = np.zeros(ct.level.n, dtype=np.uint64)
    monomial[power] = 1
    tables.forward(monomial)
    data = np.zeros_like(ct.data)
    for p in range(len(data)):
        tables.multiply_accumulate(data[p, 0], np.ascontiguousarray(ct.data[p, 0]), monomial, shoup(monomial, q))
    return RawCiphertext(ct.level, ct.scale, data).to_bytes()
