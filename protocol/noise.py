"""The Noise Protocol Framework (revision 34), for the handshakes heclave uses: ``25519``, ``AESGCM``, ``SHA256``.

heclave's sessions are ``Noise_XK_25519_AESGCM_SHA256`` (see
``protocol.channel``). This module follows the specification's objects
exactly (section 5: ``CipherState``, ``SymmetricState``, ``HandshakeState``)
and is held to the published Cacophony test vectors in the test suite; the
primitives are pyca/cryptography's. No maintained Python Noise library exists
(the last release of ``noiseprotocol`` is from 2020), hence this one; it is
small on purpose, handles only the tokens ``e s ee es se ss`` and no PSKs.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ChannelError

DHLEN = 32
HASHLEN = 32
TAGLEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the specification (section 5.1)

XK = ((), ("s",), (("e", "es"), ("e", "ee"), ("s", "se")))
"""``XK``: no initiator pre-message, the responder's static key known in advance, three messages."""
IK = ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se")))


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key (of a private key's public half)."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise ChannelError("Handshake failed; open a new session.") from None


def _hkdf(chaining_key: bytes, material: bytes, outputs: int) -> list[bytes]:
    """The specification's HKDF (section 4.3): HMAC-SHA256 chained ``outputs`` times."""
    temp = hmac.new(chaining_key, material, hashlib.sha256).digest()
    out, previous = [], b""
    for i in range(1, outputs + 1):
        previous = hmac.new(temp, previous + bytes([i]), hashlib.sha256).digest()
        out.append(previous)
    return out


@dataclass
class CipherState:
    """A key and a nonce counter (section 5.1); without a key, encryption is the identity."""

    key: bytes | None = None
    nonce: int = 0
    _aead: AESGCM | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._aead = AESGCM(self.key) if self.key is not None else None

    def has_key(self) -> bool:
        return self.key is not None

    def _nonce(self) -> bytes:
        if self.nonce >= MAX_NONCE:
            raise ChannelError("This session has sent its last message; open a new session.")
        return struct.pack(">IQ", 0, self.nonce)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        sealed = self._aead.encrypt(self._nonce(), plaintext, ad)
        self.nonce += 1
        return sealed

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt, advancing the nonce only on success (a forged message does not desynchronise)."""
        if self._aead is None:
            return ciphertext
        try:
            plaintext = self._aead.decrypt(self._nonce(), ciphertext, ad)
        except InvalidTag:
            raise ChannelError("Envelope authentication failed; open a new session.") from None
        self.nonce += 1
        return plaintext


class SymmetricState:
    """The chaining key, the handshake hash and a cipher state (section 5.2)."""

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\0")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, material: bytes) -> None:
        self.ck, key = _hkdf(self.ck, material, 2)
        self.cipher = CipherState(key)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        first, second = _hkdf(self.ck, b"", 2)
        return CipherState(first), CipherState(second)


Pattern = tuple[Sequence[str], Sequence[str], Sequence[Sequence[str]]]


class HandshakeState:
    """One side of a handshake (section 5.3): write and read its messages in turn, then :meth:`split`.

    ``ephemeral`` exists for the test vectors only; a real handshake draws a
    fresh ephemeral key, which is what makes every session's keys new.
    """

    def __init__(
        self,
        pattern: Pattern,
        name: bytes,
        initiator: bool,
        prologue: bytes,
        static: X25519PrivateKey | None = None,
        remote_static: bytes | None = None,
        ephemeral: X25519PrivateKey | None = None,
    ) -> None:
        self.initiator = initiator
        self.s, self.e, self.rs, self.re = static, ephemeral, remote_static, None
        self.symmetric = SymmetricState(name)
        self.symmetric.mix_hash(prologue)
        pre_initiator, pre_responder, self._messages = pattern
        for tokens, key in ((pre_initiator, self._initiator_static()), (pre_responder, self._responder_static())):
            if "s" in tokens:
                self.symmetric.mix_hash(key)
        self._turn = 0

    def _initiator_static(self) -> bytes | None:
        return public_bytes(self.s) if self.initiator and self.s else self.rs

    def _responder_static(self) -> bytes | None:
        return self.rs if self.initiator else (public_bytes(self.s) if self.s else None)

    @property
    def finished(self) -> bool:
        return self._turn == len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.h

    def _my_turn(self) -> bool:
        return (self._turn % 2 == 0) == self.initiator

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message of this side, carrying ``payload``."""
        if self.finished or not self._my_turn():
            raise ChannelError("Handshake message out of turn; open a new session.")
        out = []
        for token in self._messages[self._turn]:
            if token == "e":
                self.e = self.e or X25519PrivateKey.generate()
                out.append(public_bytes(self.e))
                self.symmetric.mix_hash(out[-1])
            elif token == "s":
                out.append(self.symmetric.encrypt_and_hash(public_bytes(self.s)))
            else:
                self.symmetric.mix_key(self._dh(token))
        out.append(self.symmetric.encrypt_and_hash(payload))
        self._turn += 1
        return b"".join(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the other side's next handshake message; return its payload."""
        if self.finished or self._my_turn():
            raise ChannelError("Handshake message out of turn; open a new session.")
        view = memoryview(message)
        for token in self._messages[self._turn]:
            if token == "e":
                self.re, view = bytes(view[:DHLEN]), view[DHLEN:]
                if len(self.re) != DHLEN:
                    raise ChannelError("Handshake failed; open a new session.")
                self.symmetric.mix_hash(self.re)
            elif token == "s":
                size = DHLEN + (TAGLEN if self.symmetric.cipher.has_key() else 0)
                if len(view) < size:
                    raise ChannelError("Handshake failed; open a new session.")
                self.rs, view = self.symmetric.decrypt_and_hash(bytes(view[:size])), view[size:]
            else:
                self.symmetric.mix_key(self._dh(token))
        payload = self.symmetric.decrypt_and_hash(bytes(view))
        self._turn += 1
        return payload

    def _dh(self, token: str) -> bytes:
        mine, theirs = token if self.initiator else token[::-1]
        local = self.e if mine == "e" else self.s
        remote = self.re if theirs == "e" else self.rs
        if local is None or remote is None:
            raise ChannelError("Handshake failed; open a new session.")
        return _dh(local, remote)

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport ciphers ``(send, receive)`` of this side, once the handshake is finished."""
        if not self.finished:
            raise ChannelError("The handshake is not finished; open a new session.")
        first, second = self.symmetric.split()
        return (first, second) if self.initiator else (second, first)
