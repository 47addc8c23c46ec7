"""A party's long-term identity: who a model belongs to, who may query it, whom quotas count.

An identity is two key pairs in one owner-only file (``heclave keygen``): an
X25519 key the enclave knows the party by (its static key in the session
handshake, ``protocol.channel``), and a CURVE key the server's transport knows
it by (``heclave server --allow-clients``). Two keys, because one key should
serve one protocol. Parties name each other by the identity's public key in
hex (64 characters): a model owner lists its data owners that way.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .curve import CurveKeys
from .errors import ErrorCode, HeclaveError, ProtocolError
from .noise import public_bytes
from .storage import write_atomic

FORMAT = "heclave-identity/1"


class IdentityError(HeclaveError):
    """An identity file is missing, malformed or readable by others."""

    code = ErrorCode.BAD_FIELD


def parse_public(text: str) -> bytes:
    """An identity's public key from its 64-character hex form, or an :class:`IdentityError` naming the problem."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise IdentityError(
            f"{text.strip()[:80]!r} is not an identity: expected the 64 hexadecimal characters that "
            "'heclave keygen' prints as the public identity."
        )
    return raw


@dataclass(frozen=True)
class Identity:
    """A party's two private keys; :attr:`public` names it to the enclave and to other parties."""

    static: X25519PrivateKey
    curve: CurveKeys

    @classmethod
    def generate(cls) -> Identity:
        return cls(X25519PrivateKey.generate(), CurveKeys.generate())

    @property
    def public(self) -> bytes:
        """The 32-byte public key the enclave knows this party by."""
        return public_bytes(self.static)

    @property
    def public_hex(self) -> str:
        return self.public.hex()

    def save(self, path: Path) -> None:
        """Write the identity readable by its owner only; never replaces an existing identity, even one another
        process writes at the same moment (the complete file is linked into place, which fails if one exists)."""
        secret = self.static.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        record = {"format": FORMAT, "static": secret.hex(), "curve": self.curve.secret.decode()}
        staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
        write_atomic(staged, json.dumps(record).encode() + b"\n")
        try:
            os.link(staged, path)
        except FileExistsError:
            raise IdentityError(f"{path} exists; an identity is never overwritten. Choose another path.") from None
        finally:
            staged.unlink()

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read an identity written by :meth:`save`, refusing a file that other users can read."""
        try:
            mode = os.stat(path).st_mode
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise IdentityError(
                f"Cannot read the identity {path} ({type(exc).__name__}); make one with 'heclave keygen'."
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(f"{path} is accessible to other users; run 'chmod 600 {path}'.")
        try:
            if record["format"] != FORMAT:
                raise ValueError
            static = X25519PrivateKey.from_private_bytes(bytes.fromhex(record["static"]))
            curve = CurveKeys.from_secret(record["curve"].encode(), str(path))
        except (KeyError, TypeError, ValueError, AttributeError, ProtocolError):
            raise IdentityError(f"{path} is not a {FORMAT} file; make one with 'heclave keygen'.") from None
        return cls(static, curve)
