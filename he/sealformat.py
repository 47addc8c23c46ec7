"""SEAL's byte format for ciphertexts and plaintexts, read and written with numpy.

The enclave's hot path never builds a sealapi object: a layer output arrives as
SEAL bytes, is checked here as thoroughly as SEAL's own ``load`` checks it
(header, metadata, every coefficient below its prime), and becomes a
``[size, primes, n]`` array of residues in NTT form; a re-encrypted activation
leaves as the same format, uncompressed, which SEAL loads without the zstd pass.

A serialized object is a 16-byte header (magic, header size, SEAL version,
compression mode, reserved, total size) and the object's members, compressed as
the header says. A ciphertext's members are its parms_id, NTT flag, size, ring
degree, prime count, scale and correction factor, then its coefficients as a
nested serialized array; a plaintext's are its parms_id, coefficient count and
scale, then its coefficients likewise. Only the version of SEAL that TenSEAL
bundles is read or written, as SEAL itself does.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass
from functools import cache

import numpy as np
import tenseal.sealapi as seal
import zstandard

from heclave.protocol.errors import CiphertextError

from .serialize import to_bytes

HEADER = struct.Struct("<HBBBBHQ")
MAGIC = 0xA15E
COMPRESS_NONE, COMPRESS_ZSTD = 0, 2
CIPHERTEXT = struct.Struct("<4Q?QQQdQ")
PLAINTEXT = struct.Struct("<4QQd")
COUNT = struct.Struct("<Q")


@cache
def seal_version() -> tuple[int, int]:
    """The (major, minor) version TenSEAL's SEAL writes and accepts."""
    _, _, major, minor, *_ = HEADER.unpack_from(to_bytes(seal.Plaintext()))
    return major, minor


@dataclass(frozen=True)
class Level:
    """One level of the modulus chain: its parms_id and its primes."""

    parms_id: tuple[int, ...]
    moduli: tuple[int, ...]
    n: int

    @classmethod
    def of(cls, context: seal.SEALContext, parms_id) -> Level:
        parms = context.get_context_data(parms_id).parms()
        moduli = tuple(m.value() for m in parms.coeff_modulus())
        return cls(tuple(parms_id), moduli, parms.poly_modulus_degree())

    def largest_residues(self, data: np.ndarray, what: str) -> np.ndarray:
        """Each polynomial's largest coefficient per prime (``data`` is ``[..., primes, n]``), after refusing
        any at or above its prime, as SEAL's load does; one pass over the data serves both."""
        largest = data.max(axis=-1)
        if np.any(largest >= np.array(self.moduli, dtype=np.uint64)):
            raise CiphertextError(f"The {what} has coefficients outside its moduli; it is corrupt.")
        return largest


@dataclass
class RawCiphertext:
    """A CKKS ciphertext in NTT form as residues ``[size, primes, n]``, with its level and scale."""

    level: Level
    scale: float
    data: np.ndarray

    def to_bytes(self) -> bytes:
        """SEAL's serialization, uncompressed: the coefficients are uniform, so zstd only costs time."""
        size, primes, n = self.data.shape
        members = CIPHERTEXT.pack(*self.level.parms_id, True, size, n, primes, self.scale, 1)
        coeffs = memoryview(np.ascontiguousarray(self.data, dtype="<u8")).cast("B")
        array_header = _header(COUNT.size + len(coeffs)) + COUNT.pack(self.data.size)
        head = _header(len(members) + len(array_header) + len(coeffs)) + members + array_header
        return b"".join((head, coeffs))


_LOCAL = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor: making a context costs more than decompressing a layer output."""
    if not hasattr(_LOCAL, "zstd"):
        _LOCAL.zstd = zstandard.ZstdDecompressor()
    return _LOCAL.zstd


def _header(body: int) -> bytes:
    major, minor = seal_version()
    return HEADER.pack(MAGIC, HEADER.size, major, minor, COMPRESS_NONE, 0, HEADER.size + body)


def _body(data: bytes, limit: int, what: str) -> bytes | memoryview:
    """The members of one serialized object, decompressed; the header must describe exactly ``data``."""
    if len(data) < HEADER.size:
        raise CiphertextError(f"The {what} frame is too short to hold a SEAL header.")
    magic, header_size, major, minor, mode, reserved, size = HEADER.unpack_from(data)
    if magic != MAGIC or header_size != HEADER.size or reserved or size != len(data):
        raise CiphertextError(f"The {what} frame does not start with a valid SEAL header.")
    if (major, minor) != seal_version():
        raise CiphertextError(
            f"The {what} was written by SEAL {major}.{minor}; this deployment reads SEAL "
            f"{'.'.join(map(str, seal_version()))} only."
        )
    body = memoryview(data)[HEADER.size :]
    if mode == COMPRESS_NONE:
        return body
    if mode != COMPRESS_ZSTD:
        raise CiphertextError(f"The {what} frame uses compression mode {mode}; only none and zstd are read.")
    return _inflate(body, limit, what)


def _inflate(body: memoryview, limit: int, what: str) -> bytes:
    """A zstd frame's content, never more than ``limit`` bytes whatever its header claims.

    ``ZstdDecompressor.decompress`` ignores ``max_output_size`` when the frame
    declares its content size, and allocates what the header says: an 8 KB
    frame declaring 256 MB got 256 MB. So the declared size (SEAL always
    writes one) must be within ``limit``, and a streaming read that stops at
    ``limit + 1`` bytes must yield exactly that size.
    """
    try:
        declared = zstandard.get_frame_parameters(body).content_size
        if declared == zstandard.CONTENTSIZE_UNKNOWN:
            raise CiphertextError(f"The {what} frame's zstd header does not declare its size, as SEAL's do.")
        if declared > limit:
            raise CiphertextError(
                f"The {what} frame declares {declared} bytes once decompressed; a ciphertext of its level "
                f"holds at most {limit}. Refusing it unread."
            )
        with _decompressor().stream_reader(body) as reader:
            content = reader.read(limit + 1)
    except zstandard.ZstdError:
        raise CiphertextError(f"The {what} frame's zstd stream is corrupt.") from None
    if len(content) != declared:
        raise CiphertextError(f"The {what} frame's zstd stream does not hold the size its header declares.")
    return content


def _array(body: bytes | memoryview, offset: int, count: int, what: str) -> np.ndarray:
    """The nested, uncompressed array of ``count`` uint64 coefficients that ends a serialized object."""
    nested = memoryview(body)[offset:]
    if len(nested) != HEADER.size + COUNT.size + 8 * count:
        raise CiphertextError(f"The {what} holds the wrong number of coefficients for its shape.")
    magic, header_size, major, minor, mode, reserved, size = HEADER.unpack_from(nested)
    (declared,) = COUNT.unpack_from(nested, HEADER.size)
    if (magic, header_size, (major, minor), mode, reserved, size, declared) != (
        MAGIC,
        HEADER.size,
        seal_version(),
        COMPRESS_NONE,
        0,
        len(nested),
        count,
    ):
        raise CiphertextError(f"The {what}'s coefficient array has an invalid header.")
    return np.frombuffer(nested, dtype="<u8", offset=HEADER.size + COUNT.size)


def parse_ciphertext(data: bytes, level: Level, what: str = "ciphertext", max_size: int = 3) -> RawCiphertext:
    """A validated ciphertext of 2 to ``max_size`` polynomials at ``level``; anything else is refused."""
    primes, n = len(level.moduli), level.n
    body = _body(data, CIPHERTEXT.size + HEADER.size + COUNT.size + 8 * max_size * primes * n, what)
    if len(body) < CIPHERTEXT.size:
        raise CiphertextError(f"The {what} frame is truncated.")
    *parms_id, ntt, size, degree, count, scale, correction = CIPHERTEXT.unpack_from(body)
    if tuple(parms_id) != level.parms_id:
        raise CiphertextError(f"The {what} is not at the level this step expects; refusing it.")
    if not ntt or degree != n or count != primes or correction != 1 or not 2 <= size <= max_size:
        raise CiphertextError(f"The {what} frame holds a degenerate ciphertext (size {size}); refusing it.")
    if not (math.isfinite(scale) and 1.0 <= scale < 2.0 ** sum(math.log2(q) for q in level.moduli)):
        raise CiphertextError(f"The {what} has scale {scale!r}, which its level cannot hold.")
    coeffs = _array(body, CIPHERTEXT.size, size * primes * n, what).reshape(size, primes, n)
    if not level.largest_residues(coeffs, what)[1:].any():
        raise CiphertextError(f"The {what} is transparent (its mask is zero); refusing it.")
    return RawCiphertext(level, scale, coeffs)


def parse_plaintext(data: bytes, level: Level, what: str = "plaintext") -> np.ndarray:
    """The residues ``[primes, n]`` of a plaintext in NTT form at ``level`` (a secret key is one)."""
    primes, n = len(level.moduli), level.n
    body = _body(data, PLAINTEXT.size + HEADER.size + COUNT.size + 8 * primes * n, what)
    if len(body) < PLAINTEXT.size:
        raise CiphertextError(f"The {what} frame is truncated.")
    *parms_id, count, _ = PLAINTEXT.unpack_from(body)
    if tuple(parms_id) != level.parms_id or count != primes * n:
        raise CiphertextError(f"The {what} is not a plaintext in NTT form at the expected level.")
    coeffs = _array(body, PLAINTEXT.size, count, what).reshape(primes, n)
    level.largest_residues(coeffs, what)
    return coeffs
