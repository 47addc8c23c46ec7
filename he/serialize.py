"""SEAL objects to and from bytes, validated on load.

sealapi's ``save``/``load`` work only on file paths, so the bytes pass through a
private directory on a memory-backed file system when one exists. ``load`` is
SEAL's own, which checks every coefficient against the parameters: a frame that
is not a valid ciphertext for this context is refused, never half-loaded.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from functools import cache
from typing import Protocol

import tenseal.sealapi as seal

from heclave.protocol.errors import CiphertextError


class _Saveable(Protocol):
    def save(self, path: str) -> None: ...


@cache
def _scratch() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="heclave-", dir=base)


def _path() -> str:
    # A plain string join: this runs twice per ciphertext on every hot path, where pathlib's cost shows.
    return os.path.join(_scratch(), secrets.token_hex(8))


def to_bytes(obj: _Saveable) -> bytes:
    """SEAL's own serialization (compressed, seeded where SEAL can) of a ciphertext, key or plaintext."""
    path = _path()
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _load(obj, context: seal.SEALContext, data: bytes, what: str):
    path = _path()
    try:
        with open(path, "wb") as f:
            f.write(data)
        obj.load(context, path)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CiphertextError(
            f"The {what} frame is not valid for this CKKS context ({type(exc).__name__}); "
            "it is corrupt or was made under other keys or parameters."
        ) from None
    finally:
        os.unlink(path)
    return obj


def ciphertext_from_bytes(
    context: seal.SEALContext, data: bytes, what: str = "ciphertext", max_size: int = 2
) -> seal.Ciphertext:
    """Load and validate a ciphertext of 2 (or up to ``max_size``) polynomials; reject degenerate ones."""
    ct = _load(seal.Ciphertext(), context, data, what)
    if not 2 <= ct.size() <= max_size or ct.is_transparent() or not ct.is_ntt_form():
        raise CiphertextError(f"The {what} frame holds a degenerate ciphertext (size {ct.size()}); refusing it.")
    return ct


def public_key_from_bytes(context: seal.SEALContext, data: bytes) -> seal.PublicKey:
    return _load(seal.PublicKey(), context, data, "public key")


def relin_keys_from_bytes(context: seal.SEALContext, data: bytes) -> seal.RelinKeys:
    return _load(seal.RelinKeys(), context, data, "relinearization key")


def galois_keys_from_bytes(context: seal.SEALContext, data: bytes) -> seal.GaloisKeys:
    return _load(seal.GaloisKeys(), context, data, "Galois key")


def secret_key_from_bytes(context: seal.SEALContext, data: bytes) -> seal.SecretKey:
    return _load(seal.SecretKey(), context, data, "secret key")
