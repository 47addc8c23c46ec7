"""The secure channel between an owner and the enclave, through an untrusted server.

A session is a ``Noise_XK_25519_AESGCM_SHA256`` handshake (``protocol.noise``):
the owner (initiator) knows the enclave's attested identity key in advance,
the enclave answers with a fresh ephemeral key, and only the third message
reveals and proves the owner's identity key, bound to that ephemeral key. So
every session's keys are new on both sides, a replayed first or third message
opens nothing, and the enclave learns who it talks to. The prologue binds the
label and the hash of the evidence the owner verified, so keys are bound to the
exact enclave the owner accepted.

Envelopes are the handshake's transport ciphers (AES-256-GCM, one key and one
counter per direction) with a header ``session id || counter`` as associated
data, plus a purpose string the caller chooses (``b"infer:" + request id``...).
An envelope that is replayed, reordered, truncated or altered is refused, and
the channel does not resynchronise: the owner opens a new session.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import ChannelError
from .noise import XK, CipherState, HandshakeState

PROTOCOL_NAME = b"Noise_XK_25519_AESGCM_SHA256"
LABEL = b"heclave/v2/channel"
_HEADER = struct.Struct(">16sQ")
_REFUSED = "Envelope authentication failed; open a new session."


def prologue(evidence_hash: bytes) -> bytes:
    """What both sides bind the handshake to besides the keys: the label and the verified evidence."""
    return LABEL + evidence_hash


@dataclass
class Session:
    """One side's state of an established channel: the peer's identity and the two transport ciphers."""

    session_id: bytes
    peer: bytes
    send: CipherState = field(repr=False)
    recv: CipherState = field(repr=False)

    def seal(self, plaintext: bytes, associated: bytes = b"") -> bytes:
        """Encrypt and authenticate the next envelope in this side's direction."""
        header = _HEADER.pack(self.session_id, self.send.nonce)
        return header + self.send.encrypt_with_ad(header + associated, plaintext)

    def open(self, envelope: bytes, associated: bytes = b"") -> bytes:
        """Authenticate and decrypt the next envelope from the other side.

        Raises :class:`ChannelError` for any envelope that is not exactly the
        next one, unmodified, with the same associated data.
        """
        if not isinstance(envelope, bytes) or len(envelope) < _HEADER.size + 16:
            raise ChannelError(_REFUSED)
        header = envelope[: _HEADER.size]
        session_id, counter = _HEADER.unpack(header)
        if session_id != self.session_id or counter != self.recv.nonce:
            raise ChannelError(_REFUSED)
        return self.recv.decrypt_with_ad(header + associated, envelope[_HEADER.size :])


def _established(handshake: HandshakeState) -> Session:
    send, recv = handshake.split()
    return Session(handshake.handshake_hash[:16], handshake.rs, send, recv)


class OwnerHandshake:
    """The owner's side: :meth:`first` to send, then :meth:`finish` with the enclave's answer."""

    def __init__(self, identity: X25519PrivateKey, enclave_public: bytes, evidence_hash: bytes) -> None:
        if len(enclave_public) != 32:
            raise ChannelError("The enclave's identity key must be 32 bytes.")
        self._state = HandshakeState(
            XK, PROTOCOL_NAME, True, prologue(evidence_hash), static=identity, remote_static=enclave_public
        )

    def first(self) -> bytes:
        """Message 1: a fresh ephemeral key, mixed with the enclave's identity key."""
        return self._state.write_message()

    def finish(self, answer: bytes) -> tuple[bytes, Session]:
        """Read the enclave's message 2; return message 3 (this owner's identity, proven) and the session."""
        self._state.read_message(answer)
        third = self._state.write_message()
        return third, _established(self._state)


class EnclaveHandshake:
    """The enclave's side: answer a first message with a fresh ephemeral key, then accept the third."""

    def __init__(self, identity: X25519PrivateKey, evidence_hash: bytes) -> None:
        self._state = HandshakeState(XK, PROTOCOL_NAME, False, prologue(evidence_hash), static=identity)

    def answer(self, first: bytes) -> bytes:
        """Read message 1 and write message 2."""
        self._state.read_message(first)
        return self._state.write_message()

    def accept(self, third: bytes) -> Session:
        """Read message 3: the session, and (as its ``peer``) the identity that proved its key."""
        self._state.read_message(third)
        return _established(self._state)
