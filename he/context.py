"""CKKS parameters, the public context every party shares, and the secret key set.

heclave's enclave re-encrypts every layer's input, so each linear layer starts
at the top level and needs multiplicative depth one: the coefficient modulus is
one 60-bit prime for decryption headroom, one 40-bit prime that the single
rescale consumes, and the 60-bit special prime for key switching. With N = 8192
that is 160 bits, inside SEAL's 128-bit-security bound of 218 bits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
import numpy as np
import tenseal.sealapi as seal

from heclave.graph.params import CkksParams
from heclave.protocol.errors import CiphertextError, ErrorCode, ProtocolError

from .rns import Limb, limb, shoup
from .sampling import centered_binomial, uniform_residues
from .sealformat import Level, RawCiphertext, parse_ciphertext, parse_plaintext
from .serialize import (
    ciphertext_from_bytes,
    galois_keys_from_bytes,
    public_key_from_bytes,
    relin_keys_from_bytes,
    secret_key_from_bytes,
    to_bytes,
)
from .slots import SlotCodec

CONTEXT_FORMAT = 1

# One prime's tables with a power of the secret key in NTT form and its Shoup companion.
_KeyLimb = tuple[Limb, np.ndarray, np.ndarray]


@dataclass
class KeyMask:
    """A uniform ``a`` and ``-(a s)`` in NTT form at the top level (``[primes, n]`` each), and the noise
    ``e`` (``[n]``, small integers) the encryption will add to the message before transforming it.

    As secret as the key itself, since ``a`` and ``-(a s)`` together give ``s``: it exists
    only inside the enclave, has no serialisation, and is used for exactly one
    encryption (:meth:`SecretKeySet.encrypt_masked`), which adds fresh noise.
    """

    a: np.ndarray = field(repr=False)
    minus_as: np.ndarray = field(repr=False)
    noise: np.ndarray = field(repr=False)
    used: bool = False


def seal_context(params: CkksParams) -> seal.SEALContext:
    """SEAL's context for ``params``, checked at 128-bit security, or a :class:`ProtocolError`."""
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bits)))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ProtocolError(
            f"CKKS parameters {params} are invalid: {context.parameters_error_message()}", ErrorCode.BAD_FIELD
        )
    return context


PARAMETERS_FORMAT = 1


def public_parameters(params: CkksParams) -> bytes:
    """What the enclave's evidence binds besides its identity key: the CKKS parameters every model uses.

    Each model's keys are made at its registration and reach its owners through
    their secure sessions, so the evidence binds the parameters, not any key.
    """
    return msgpack.packb({"format": PARAMETERS_FORMAT, "params": params.to_wire()}, use_bin_type=True)


def parameters_from_bytes(data: bytes) -> CkksParams:
    """The parameters :func:`public_parameters` wrote, or a :class:`ProtocolError`."""
    try:
        d = msgpack.unpackb(data, raw=False)
        if d.get("format") != PARAMETERS_FORMAT:
            raise ProtocolError(
                f"Public parameters of format {d.get('format')!r}; this side reads {PARAMETERS_FORMAT}. "
                "Upgrade the older side.",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        return CkksParams.from_wire(d["params"])
    except (KeyError, TypeError, AttributeError, ValueError, msgpack.UnpackException):
        raise ProtocolError("The enclave's public parameters are malformed.", ErrorCode.BAD_FIELD) from None


def galois_element(step: int, params: CkksParams) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots."""
    return pow(3, step % params.slots, 2 * params.poly_modulus_degree)


@dataclass
class Toolkit:
    """SEAL objects built once per context and shared by the kernels of a process."""

    params: CkksParams
    context: seal.SEALContext = field(init=False)
    encoder: seal.CKKSEncoder = field(init=False)
    evaluator: seal.Evaluator = field(init=False)

    def __post_init__(self) -> None:
        self.context = seal_context(self.params)
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)

    def encode(self, values: np.ndarray, scale: float | None = None) -> seal.Plaintext:
        """Encode a real or complex vector (zero-padded to the slot count) at the top level."""
        values = np.asarray(values)
        if len(values) > self.params.slots:
            raise ValueError(f"{len(values)} values do not fit in {self.params.slots} slots.")
        kind = np.complex128 if np.iscomplexobj(values) else np.float64
        plain = seal.Plaintext()
        self.encoder.encode(values.astype(kind).tolist(), scale or self.params.scale, plain)
        return plain

    def load_ciphertext(self, data: bytes, what: str = "ciphertext", top_level: bool = True) -> seal.Ciphertext:
        """A validated ciphertext; fresh inputs must be at the top level and the standard scale.

        Layer outputs (``top_level=False``) may keep the third polynomial of an
        unrelinearized product: the enclave decrypts them as they are.
        """
        ct = ciphertext_from_bytes(self.context, data, what, max_size=2 if top_level else 3)
        if top_level and (ct.parms_id() != self.context.first_parms_id() or ct.scale != self.params.scale):
            raise CiphertextError(
                f"The {what} is not a fresh ciphertext at the top level with scale 2^{self.params.scale_bits}; "
                "encrypt inputs with the deployment's public context."
            )
        return ct


class PublicContext:
    """What every party may hold: parameters, public key, relinearization keys, Galois keys.

    ``to_bytes`` is the exact byte string the enclave's evidence binds, so an
    owner checks the evidence against what it actually received.
    """

    def __init__(
        self,
        params: CkksParams,
        public_key: bytes,
        relin_keys: bytes,
        galois_keys: bytes = b"",
        galois_steps: Iterable[int] = (),
    ) -> None:
        self.params = params
        self.toolkit = Toolkit(params)
        self.public_key_bytes = public_key
        self.relin_keys_bytes = relin_keys
        self._galois_bytes = galois_keys
        self.galois_steps = tuple(sorted(set(galois_steps)))
        self.public_key = public_key_from_bytes(self.toolkit.context, public_key)
        self.relin_keys = relin_keys_from_bytes(self.toolkit.context, relin_keys)
        self.galois_keys = galois_keys_from_bytes(self.toolkit.context, galois_keys) if galois_keys else None
        self._encryptor = seal.Encryptor(self.toolkit.context, self.public_key)

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "format": CONTEXT_FORMAT,
                "params": self.params.to_wire(),
                "public_key": self.public_key_bytes,
                "relin_keys": self.relin_keys_bytes,
                "galois_keys": self._galois_bytes,
                "galois_steps": list(self.galois_steps),
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicContext:
        try:
            d = msgpack.unpackb(data, raw=False)
            if d.get("format") != CONTEXT_FORMAT:
                raise ProtocolError(
                    f"Public context format {d.get('format')!r} is not {CONTEXT_FORMAT}; upgrade the older side.",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            return cls(
                CkksParams.from_wire(d["params"]),
                d["public_key"],
                d["relin_keys"],
                d.get("galois_keys", b""),
                d.get("galois_steps", ()),
            )
        except (KeyError, TypeError, AttributeError, ValueError, msgpack.UnpackException):
            raise ProtocolError("The public context is malformed.", ErrorCode.BAD_FIELD) from None

    def with_galois(self, galois_keys: bytes, steps: Iterable[int]) -> PublicContext:
        """The same context plus Galois keys for exactly the rotation steps a plan uses."""
        return PublicContext(self.params, self.public_key_bytes, self.relin_keys_bytes, galois_keys, steps)

    def encrypt(self, values: np.ndarray) -> bytes:
        """Public-key encryption of a real vector, serialised."""
        ct = seal.Ciphertext()
        self._encryptor.encrypt(self.toolkit.encode(values), ct)
        return to_bytes(ct)


class SecretKeySet:
    """The full CKKS key set. Only the enclave constructs one; the secret key never leaves it."""

    def __init__(self, params: CkksParams, restored: dict | None = None) -> None:
        """A fresh key set, or the one :meth:`export` wrote (public keys included, so they stay identical)."""
        self.params = params
        self.toolkit = Toolkit(params)
        context = self.toolkit.context
        if restored is None:
            self._keygen = seal.KeyGenerator(context)
            public_key = seal.PublicKey()
            self._keygen.create_public_key(public_key)
            self.public = PublicContext(params, to_bytes(public_key), to_bytes(self._keygen.create_relin_keys()))
        else:
            self._keygen = seal.KeyGenerator(context, secret_key_from_bytes(context, restored["secret_key"]))
            self.public = PublicContext(params, restored["public_key"], restored["relin_keys"])
        self._secret = self._keygen.secret_key()
        self._encryptor = seal.Encryptor(context, self._secret)
        self._decryptor = seal.Decryptor(context, self._secret)
        self._top = Level.of(context, context.first_parms_id())
        self.output_level = Level.of(context, context.first_context_data().next_context_data().parms_id())
        self._codec = SlotCodec(params.poly_modulus_degree)
        self._top_key, self._output_key = self._key_residues(context)

    def export(self) -> dict:
        """The whole key set, for sealing to the enclave's own storage only."""
        return {
            "params": self.params.to_wire(),
            "secret_key": to_bytes(self._secret),
            "public_key": self.public.public_key_bytes,
            "relin_keys": self.public.relin_keys_bytes,
        }

    def galois_keys(self, steps: Iterable[int]) -> bytes:
        """Seeded Galois keys for exactly these left-rotation steps."""
        elements = sorted({galois_element(s, self.params) for s in steps if s % self.params.slots})
        return to_bytes(self._keygen.create_galois_keys(elements)) if elements else b""

    def encrypt_symmetric(self, values: np.ndarray) -> bytes:
        """Secret-key encryption, serialised seeded: faster and half the bytes of public-key encryption."""
        return to_bytes(self._encryptor.encrypt_symmetric(self.toolkit.encode(values)))

    def _key_residues(self, context: seal.SEALContext) -> tuple[list[_KeyLimb], list[_KeyLimb]]:
        """``s`` on each top-level prime (for masks), and ``s``, ``s^2`` on the output level's prime
        (for decrypting two- and three-polynomial ciphertexts), each with its Shoup companion."""
        if len(self.output_level.moduli) != 1:
            raise ProtocolError(
                f"CKKS parameters {self.params} leave {len(self.output_level.moduli)} primes after a layer's "
                "rescale; heclave's layers have depth one, so use one data prime, one rescale prime and the "
                "special prime (for example q = (60, 40, 60)).",
                ErrorCode.BAD_FIELD,
            )
        key = parse_plaintext(to_bytes(self._secret), Level.of(context, context.key_parms_id()), "secret key")
        n = self.params.poly_modulus_degree
        top = [(limb(q, n), key[i], shoup(key[i], q)) for i, q in enumerate(self._top.moduli)]
        tables, s, s_shoup = top[0]
        square = np.zeros_like(s)
        tables.multiply_accumulate(square, s, s, s_shoup)
        return top, [top[0], (tables, square, shoup(square, tables.q))]

    def key_mask(self) -> KeyMask:
        """A fresh uniform mask ``a``, ``-(a s)`` and noise at the top level: everything of an encryption
        that does not depend on the message, which the enclave makes between requests."""
        n = self.params.poly_modulus_degree
        a = np.stack([uniform_residues(tables.q, n) for tables, _, _ in self._top_key])
        minus_as = np.zeros_like(a)
        for i, (tables, s, s_shoup) in enumerate(self._top_key):
            tables.multiply_accumulate(minus_as[i], a[i], s, s_shoup)
            minus_as[i] = tables.negate(minus_as[i])
        return KeyMask(a, minus_as, centered_binomial(n))

    def encrypt_masked(self, mask: KeyMask, values: np.ndarray) -> bytes:
        """``values`` encrypted under the secret key as ``(m + e - a s, a)``, serialised; ``mask`` is used up.

        This is SEAL's symmetric encryption, ``(-(a s + e), a)`` plus the
        plaintext, with the mask's noise (``he.sampling``; its distribution is
        symmetric, so ``+e`` and ``-e`` are the same) added to the encoded
        message before the one transform per prime both need.
        """
        if mask.used:
            raise ValueError("This key mask was already used; each one encrypts exactly one message.")
        try:
            coefficients = self._codec.encode(values, self.params.scale)
        except OverflowError as exc:
            raise CiphertextError(
                f"{exc} The layer's ciphertexts decrypted to noise (were they made under other keys?) "
                "or the model's activations overflow the deployment's CKKS parameters."
            ) from None
        coefficients += mask.noise
        data = np.empty((2, *mask.a.shape), dtype=np.uint64)
        for i, (tables, _, _) in enumerate(self._top_key):
            tables.reduce(coefficients, out=data[0, i])
            tables.forward(data[0, i])
            tables.add(data[0, i], mask.minus_as[i])
        data[1] = mask.a
        mask.used = True
        return RawCiphertext(self._top, self.params.scale, data).to_bytes()

    @property
    def output_scale(self) -> float:
        """The scale of every linear layer's output: a top-level product, rescaled by the last data prime."""
        return self.params.scale * self.params.scale / self._top.moduli[-1]

    def decrypt_output(self, frame: bytes, what: str = "layer output", polynomials: int | None = None) -> np.ndarray:
        """The complex slots of a serialised ciphertext exactly as a linear layer leaves it.

        The frame is validated as SEAL's ``load`` would (``he.sealformat``), and
        refused unless it is at the layer's output level, at its output scale
        (:attr:`output_scale`), and of ``polynomials`` polynomials when given (a
        layer with encrypted weights may leave three): the enclave trusts none
        of the metadata the server writes into a ciphertext.
        """
        ct = parse_ciphertext(frame, self.output_level, what)
        if ct.scale != self.output_scale:
            raise CiphertextError(f"The {what} is not at the scale a linear layer leaves; refusing it.")
        if polynomials is not None and len(ct.data) != polynomials:
            raise CiphertextError(f"The {what} has {len(ct.data)} polynomials, the layer leaves {polynomials}.")
        tables = self._output_key[0][0]
        plain = np.array(ct.data[0, 0])
        for (_, power, power_shoup), mask in zip(self._output_key, ct.data[1:, 0]):
            tables.multiply_accumulate(plain, mask, power, power_shoup)
        tables.inverse(plain)
        return self._codec.decode(tables.centered(plain), ct.scale)

    def decrypt(self, ct: seal.Ciphertext) -> np.ndarray:
        """The real parts of the slots."""
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return np.fromiter(self.toolkit.encoder.decode_double(plain), np.float64, self.params.slots)

    def decrypt_complex(self, ct: seal.Ciphertext) -> np.ndarray:
        """The slots as complex numbers: both lanes of a batch (``graph.layouts.base.LANES``), at the same cost."""
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return np.fromiter(self.toolkit.encoder.decode_complex(plain), np.complex128, self.params.slots)
