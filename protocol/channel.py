"""The secure channel between an owner and the enclave, through an untrusted server.

Key agreement is X25519 between the owner's fresh key and the enclave's attested
identity key. Both sides derive their keys with HKDF-SHA256 from the shared
secret, salted with a hash of the transcript (both public keys and the evidence
hash), so a key is bound to the exact enclave the owner verified. Envelopes are
AES-256-GCM with one key and one strictly increasing counter per direction; the
counter is the nonce and part of the associated data. An envelope that is
replayed, reordered, truncated or altered is refused, and the channel does not
resynchronise: the owner opens a new session.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ChannelError

LABEL = b"heclave/v1/channel"
TO_ENCLAVE = 0
TO_OWNER = 1
_HEADER = struct.Struct(">16sBQ")


def raw_public(key: X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public(data: bytes) -> X25519PublicKey:
    """Parse 32 raw bytes as an X25519 public key, or raise :class:`ChannelError`."""
    if len(data) != 32:
        raise ChannelError("An X25519 public key is exactly 32 bytes.")
    return X25519PublicKey.from_public_bytes(data)


def transcript(owner_public: bytes, enclave_public: bytes, evidence_hash: bytes) -> bytes:
    """What both sides bind their keys to: the label, both public keys, the evidence hash."""
    return LABEL + owner_public + enclave_public + evidence_hash


@dataclass
class Session:
    """One side's state of a channel: two keys, two counters, and the session id."""

    session_id: bytes
    send_key: bytes
    recv_key: bytes
    send_direction: int
    confirm_key: bytes
    transcript_hash: bytes
    sent: int = 0
    received: int = 0
    _send_aead: AESGCM = field(init=False, repr=False)
    _recv_aead: AESGCM = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._send_aead = AESGCM(self.send_key)
        self._recv_aead = AESGCM(self.recv_key)

    def seal(self, plaintext: bytes, associated: bytes = b"") -> bytes:
        """Encrypt and authenticate the next envelope in this side's direction."""
        header = _HEADER.pack(self.session_id, self.send_direction, self.sent)
        nonce = struct.pack(">IQ", self.send_direction, self.sent)
        self.sent += 1
        return header + self._send_aead.encrypt(nonce, plaintext, header + associated)

    def open(self, envelope: bytes, associated: bytes = b"") -> bytes:
        """Authenticate and decrypt the next envelope from the other side.

        Raises :class:`ChannelError` for any envelope that is not exactly the
        next one, unmodified, with the same associated data.
        """
        if len(envelope) < _HEADER.size + 16:
            raise ChannelError("Envelope authentication failed; open a new session.")
        header = envelope[: _HEADER.size]
        session_id, direction, counter = _HEADER.unpack(header)
        expected_direction = 1 - self.send_direction
        if session_id != self.session_id or direction != expected_direction or counter != self.received:
            raise ChannelError("Envelope authentication failed; open a new session.")
        nonce = struct.pack(">IQ", direction, counter)
        try:
            plaintext = self._recv_aead.decrypt(nonce, envelope[_HEADER.size :], header + associated)
        except InvalidTag:
            raise ChannelError("Envelope authentication failed; open a new session.") from None
        self.received += 1
        return plaintext

    def confirmation(self) -> bytes:
        """A tag proving knowledge of the session keys, hence of the identity key."""
        return hmac.new(self.confirm_key, b"confirm" + self.transcript_hash, hashlib.sha256).digest()


def _derive(shared: bytes, transcript_bytes: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    digest = hashlib.sha256(transcript_bytes).digest()
    material = HKDF(hashes.SHA256(), 96, salt=digest, info=LABEL + b"/keys").derive(shared)
    return material[:32], material[32:64], material[64:96], digest[:16], digest


def open_owner_session(enclave_public: bytes, evidence_hash: bytes) -> tuple[Session, bytes]:
    """The owner's side: a fresh key pair; returns the session and the public key to send."""
    own = X25519PrivateKey.generate()
    own_public = raw_public(own.public_key())
    shared = own.exchange(load_public(enclave_public))
    to_enclave, to_owner, confirm, sid, digest = _derive(shared, transcript(own_public, enclave_public, evidence_hash))
    return Session(sid, to_enclave, to_owner, TO_ENCLAVE, confirm, digest), own_public


def accept_owner_session(identity: X25519PrivateKey, owner_public: bytes, evidence_hash: bytes) -> Session:
    """The enclave's side of a session an owner opened with its public key."""
    shared = identity.exchange(load_public(owner_public))
    enclave_public = raw_public(identity.public_key())
    to_enclave, to_owner, confirm, sid, digest = _derive(
        shared, transcript(owner_public, enclave_public, evidence_hash)
    )
    return Session(sid, to_owner, to_enclave, TO_OWNER, confirm, digest)


def check_confirmation(session: Session, tag: bytes) -> None:
    """Refuse a session whose enclave could not prove it holds the identity key."""
    if not hmac.compare_digest(session.confirmation(), tag):
        raise ChannelError("The enclave did not prove possession of its attested identity key.")
