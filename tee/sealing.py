"""Sealed enclave state: the key set and identity key survive a restart, readable only by this enclave.

Under Gramine the sealing key is Gramine's MRENCLAVE-bound key
(``/dev/attestation/keys/_sgx_mrenclave``) run through HKDF, so only the same
enclave code on the same CPU can unseal. Natively there is no such key: a
development key file beside the state stands in for it, which protects nothing
against the host and is logged as such. Files are written atomically (temporary
file, fsync, rename), so a crash leaves the old state or the new, never half.

Rollback is not prevented: the host can replace the sealed files with older
ones (sealing gives confidentiality and integrity, not freshness).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from heclave.protocol.errors import AttestationError, ErrorCode, HeclaveError
from heclave.protocol.storage import write_atomic

from .runtime import ATTESTATION_DIR

log = logging.getLogger(__name__)

SEALED_FORMAT = 2
DEV_KEY_FILE = "dev-sealing.key"
_LABEL = b"heclave/v1/sealed/"


def sealing_key(state_dir: Path, attestation_dir: Path = ATTESTATION_DIR) -> bytes:
    """The 32-byte AES key sealed state is encrypted under, in this runtime."""
    hardware = attestation_dir / "keys" / "_sgx_mrenclave"
    if hardware.exists():
        material, salt = hardware.read_bytes(), b"sgx-mrenclave"
    else:
        material, salt = _development_key(state_dir), b"development"
    return HKDF(hashes.SHA256(), 32, salt=salt, info=_LABEL + b"key").derive(material)


def _development_key(state_dir: Path) -> bytes:
    path = state_dir / DEV_KEY_FILE
    if not path.exists():
        write_atomic(path, secrets.token_bytes(32))
    log.warning("sealing with the development key %s: the host can read this state (no SGX)", path)
    return path.read_bytes()


def seal(key: bytes, kind: str, payload: dict, name: str = "") -> bytes:
    """Encrypt and authenticate a state record; its ``kind`` and ``name`` (a model id) are associated data,
    so the host can neither pass one kind of record for another nor swap two models' records."""
    nonce = secrets.token_bytes(12)
    header = msgpack.packb({"format": SEALED_FORMAT, "kind": kind, "name": name})
    body = AESGCM(key).encrypt(nonce, msgpack.packb(payload, use_bin_type=True), _LABEL + header)
    return msgpack.packb({"header": header, "nonce": nonce, "body": body}, use_bin_type=True)


def unseal(key: bytes, kind: str, blob: bytes, origin: Path, name: str = "") -> dict:
    """Decrypt a record sealed by :func:`seal`, refusing another format, kind, name or key."""
    try:
        outer = msgpack.unpackb(blob, raw=False)
        header = msgpack.unpackb(outer["header"], raw=False)
    except Exception:
        raise HeclaveError(f"{origin} is not sealed heclave state.", ErrorCode.INTERNAL) from None
    if header.get("format") != SEALED_FORMAT or header.get("kind") != kind:
        raise HeclaveError(
            f"{origin} holds sealed {header.get('kind')!r} format {header.get('format')!r}; this enclave reads "
            f"{kind!r} format {SEALED_FORMAT}. Move the state directory aside to start with fresh keys.",
            ErrorCode.INTERNAL,
        )
    if header.get("name") != name:
        raise AttestationError(f"{origin} holds the sealed record of another {kind} (moved or swapped by the host).")
    try:
        plain = AESGCM(key).decrypt(outer["nonce"], outer["body"], _LABEL + outer["header"])
    except (InvalidTag, KeyError, TypeError, ValueError):
        raise AttestationError(
            f"{origin} cannot be unsealed: it was sealed by another enclave build or altered."
        ) from None
    return msgpack.unpackb(plain, raw=False)
