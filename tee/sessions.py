"""The enclave's sessions: handshakes in progress and established channels, with limits per identity.

A first handshake message costs the enclave one ephemeral key and a slot among
the pending handshakes (bounded, short-lived, oldest dropped first: a dropped
owner just retries). A session exists only once the third message proved an
identity key, and it is never replaced: its id is the handshake hash, new for
every handshake. Each identity holds at most ``PER_IDENTITY`` sessions; opening
one more closes that identity's own least recently used session, never anyone
else's. Above that, two ceilings: all sessions, and the share of identities
without standing (owning no model and named on no model's list), so a flood
of fresh identities is refused with ``quota`` instead of evicting the sessions
of the owners and data owners the enclave already knows.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from heclave.protocol.channel import EnclaveHandshake, Session
from heclave.protocol.errors import ChannelError, ErrorCode, HeclaveError, QuotaError

PENDING_LIMIT = 1024
PENDING_TTL_S = 60.0
PER_IDENTITY = 16
LIMIT = 4096
NEWCOMERS = 1024
IDLE_S = 3600.0


@dataclass
class _Entry:
    session: Session
    used: float


class SessionTable:
    """Pending handshakes and established sessions of one enclave."""

    def __init__(
        self,
        identity: X25519PrivateKey,
        evidence_hash: bytes,
        standing: Callable[[bytes], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._identity, self._evidence_hash = identity, evidence_hash
        self._standing, self._clock = standing, clock
        self._pending: OrderedDict[bytes, tuple[EnclaveHandshake, float]] = OrderedDict()
        self._sessions: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def answer(self, first: bytes) -> tuple[bytes, bytes]:
        """Message 2 for a first handshake message, and the id under which the third must come."""
        handshake = EnclaveHandshake(self._identity, self._evidence_hash)
        second = handshake.answer(first)
        self._expire()
        handshake_id = secrets.token_bytes(16)
        self._pending[handshake_id] = (handshake, self._clock())
        while len(self._pending) > PENDING_LIMIT:
            self._pending.popitem(last=False)
        return handshake_id, second

    def accept(self, handshake_id: bytes, third: bytes) -> Session:
        """Establish the session a third message completes; the pending handshake is used up either way."""
        self._expire()
        pending = self._pending.pop(handshake_id, None)
        if pending is None:
            raise HeclaveError(
                "No such handshake is pending (never started, already completed, or expired); start again.",
                ErrorCode.UNKNOWN_SESSION,
            )
        session = pending[0].accept(third)
        if session.session_id in self._sessions:
            raise ChannelError("Handshake failed; open a new session.")
        self._admit(session.peer)
        self._sessions[session.session_id] = _Entry(session, self._clock())
        return session

    def _admit(self, peer: bytes) -> None:
        """Make room for one more session of ``peer``, or refuse with ``quota``."""
        own = [sid for sid, entry in self._sessions.items() if entry.session.peer == peer]
        if len(own) >= PER_IDENTITY:
            del self._sessions[own[0]]  # least recently used first: the table is kept in order of use
            return
        if len(self._sessions) >= LIMIT:
            raise QuotaError(f"The enclave holds its ceiling of {LIMIT} sessions; retry later.")
        if not self._standing(peer) and self._newcomers() >= NEWCOMERS:
            raise QuotaError(
                f"The enclave holds {NEWCOMERS} sessions of identities that own no model and are named on no "
                "model's list; retry later, or ask a model owner to name this identity."
            )

    def _newcomers(self) -> int:
        return sum(1 for entry in self._sessions.values() if not self._standing(entry.session.peer))

    def get(self, session_id: bytes) -> Session:
        """The established session, marked as used now; ``unknown_session`` if there is none."""
        entry = self._sessions.get(session_id)
        if entry is None or self._clock() - entry.used > IDLE_S:
            raise HeclaveError("Unknown or expired session; open a new session.", ErrorCode.UNKNOWN_SESSION)
        entry.used = self._clock()
        self._sessions.move_to_end(session_id)
        return entry.session

    def _expire(self) -> None:
        now = self._clock()
        while self._pending and now - next(iter(self._pending.values()))[1] > PENDING_TTL_S:
            self._pending.popitem(last=False)
        while self._sessions and now - next(iter(self._sessions.values())).used > IDLE_S:
            self._sessions.popitem(last=False)
