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

A payload larger than one ``CHUNK_BYTES`` frame (a model's secrets, sealed
to the enclave) goes as several envelopes (:func:`seal_chunks`), each bound
by its associated data to the purpose, its position, the number of chunks and
the total size: the counters already refuse a reordered, repeated or missing
envelope, and the bound count and total refuse a payload cut short after a
whole envelope. The receiver checks the declared total against its limit
before it allocates anything (:func:`open_chunks`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import ChannelError, ErrorCode, HeclaveError, ProtocolError
from .noise import XK, CipherState, HandshakeState
from .streams import CHUNK_BYTES, chunk_count, chunks_of

PROTOCOL_NAME = b"Noise_XK_25519_AESGCM_SHA256"
LABEL = b"heclave/v2/channel"
_HEADER = struct.Struct(">16sQ")
_CHUNK = struct.Struct(">IIQ")  # a sealed chunk's index, the number of chunks, the payload's total size
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


def seal_chunks(session: Session, payload: bytes, purpose: bytes) -> list[bytes]:
    """``payload`` sealed in ``session`` as envelopes of at most ``CHUNK_BYTES`` of it each, every one bound to
    ``purpose``, its index, the number of chunks and ``len(payload)``; send that total beside them."""
    count = chunk_count(len(payload))
    return [
        session.seal(chunk, purpose + _CHUNK.pack(index, count, len(payload)))
        for index, chunk in enumerate(chunks_of(payload))
    ]


def open_chunks(session: Session, envelopes: Sequence[bytes], purpose: bytes, total: int, limit: int) -> bytearray:
    """The payload :func:`seal_chunks` sealed, if its declared ``total`` is at most ``limit`` (checked before
    anything is allocated) and ``envelopes`` are exactly its chunks, in order, each unaltered.

    Raises ``too_large`` for a total past the limit, ``incomplete`` for a number of envelopes the total does
    not need, and :class:`ChannelError` for anything else (a chunk reordered, repeated, dropped and replaced,
    altered, or sealed for another total).
    """
    if not 0 <= total <= limit:
        raise ProtocolError(
            f"A sealed payload of {total} bytes exceeds the limit of {limit}; nothing was opened.", ErrorCode.TOO_LARGE
        )
    count = chunk_count(total)
    if len(envelopes) != count:
        raise HeclaveError(
            f"A sealed payload of {total} bytes comes in {count} envelopes, not {len(envelopes)}: some were dropped "
            "or repeated on the way. Open a new session and send it again.",
            ErrorCode.INCOMPLETE,
        )
    payload = bytearray(total)
    for index, envelope in enumerate(envelopes):
        chunk = session.open(envelope, purpose + _CHUNK.pack(index, count, total))
        start = index * CHUNK_BYTES
        if len(chunk) != min(CHUNK_BYTES, total - start):
            raise ChannelError(_REFUSED)
        payload[start : start + len(chunk)] = chunk
    return payload


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
