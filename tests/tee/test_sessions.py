"""The enclave's session table: fresh sessions only, limits per identity, and room kept for known identities."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from heclave.protocol.channel import OwnerHandshake
from heclave.protocol.errors import ChannelError, ErrorCode, HeclaveError, QuotaError
from heclave.protocol.noise import public_bytes
from heclave.tee import sessions
from heclave.tee.sessions import SessionTable

EVIDENCE = b"e" * 32


class Clock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _table(standing=lambda peer: False, clock=None) -> tuple[SessionTable, bytes]:
    enclave = X25519PrivateKey.generate()
    return SessionTable(enclave, EVIDENCE, standing, clock or Clock()), public_bytes(enclave)


def _open(table: SessionTable, enclave_public: bytes, owner: X25519PrivateKey):
    handshake = OwnerHandshake(owner, enclave_public, EVIDENCE)
    first = handshake.first()
    handshake_id, second = table.answer(first)
    third, session = handshake.finish(second)
    return table.accept(handshake_id, third), session, (first, handshake_id, third)


def test_a_third_message_completes_one_handshake_once():
    table, enclave_public = _table()
    accepted, owner_side, (first, handshake_id, third) = _open(table, enclave_public, X25519PrivateKey.generate())
    assert table.get(owner_side.session_id) is accepted and len(table) == 1
    with pytest.raises(HeclaveError) as replayed:
        table.accept(handshake_id, third)
    assert replayed.value.code is ErrorCode.UNKNOWN_SESSION
    again_id, _ = table.answer(first)  # the replayed first message gets a fresh ephemeral key ...
    with pytest.raises(ChannelError):
        table.accept(again_id, third)  # ... which the recorded third message was not made for
    assert len(table) == 1, "replays must not open (or replace) a session"


def test_one_identity_past_its_limit_closes_its_own_oldest_session_only():
    table, enclave_public = _table()
    other = _open(table, enclave_public, X25519PrivateKey.generate())[1]
    busy = X25519PrivateKey.generate()
    opened = [_open(table, enclave_public, busy)[1] for _ in range(sessions.PER_IDENTITY + 3)]
    for closed in opened[:3]:
        with pytest.raises(HeclaveError, match="Unknown or expired"):
            table.get(closed.session_id)
    for kept in opened[3:]:
        table.get(kept.session_id)
    table.get(other.session_id)


def test_fresh_identities_cannot_take_the_room_of_known_ones(monkeypatch):
    monkeypatch.setattr(sessions, "NEWCOMERS", 4)
    known = X25519PrivateKey.generate()
    table, enclave_public = _table(standing=lambda peer: peer == public_bytes(known))
    for _ in range(4):
        _open(table, enclave_public, X25519PrivateKey.generate())
    with pytest.raises(QuotaError):
        _open(table, enclave_public, X25519PrivateKey.generate())
    session = _open(table, enclave_public, known)[1]
    assert table.get(session.session_id).peer == public_bytes(known)


def test_the_ceiling_refuses_instead_of_evicting(monkeypatch):
    monkeypatch.setattr(sessions, "LIMIT", 3)
    table, enclave_public = _table()
    first = [_open(table, enclave_public, X25519PrivateKey.generate())[1] for _ in range(3)]
    with pytest.raises(QuotaError) as refused:
        _open(table, enclave_public, X25519PrivateKey.generate())
    assert refused.value.code is ErrorCode.QUOTA and "ceiling" in refused.value.message
    for session in first:
        table.get(session.session_id)


def test_idle_sessions_and_stale_handshakes_expire():
    clock = Clock()
    table, enclave_public = _table(clock=clock)
    session = _open(table, enclave_public, X25519PrivateKey.generate())[1]
    handshake = OwnerHandshake(X25519PrivateKey.generate(), enclave_public, EVIDENCE)
    handshake_id, second = table.answer(handshake.first())
    clock.now += sessions.PENDING_TTL_S + 1
    table.get(session.session_id)  # in use: stays
    with pytest.raises(HeclaveError, match="pending"):
        table.accept(handshake_id, handshake.finish(second)[0])
    clock.now += sessions.IDLE_S + 1
    with pytest.raises(HeclaveError, match="Unknown or expired"):
        table.get(session.session_id)


def test_pending_handshakes_are_bounded(monkeypatch):
    monkeypatch.setattr(sessions, "PENDING_LIMIT", 2)
    table, enclave_public = _table()
    handshakes = [OwnerHandshake(X25519PrivateKey.generate(), enclave_public, EVIDENCE) for _ in range(3)]
    answered = [table.answer(h.first()) for h in handshakes]
    with pytest.raises(HeclaveError, match="pending"):
        table.accept(answered[0][0], handshakes[0].finish(answered[0][1])[0])
    for handshake, (handshake_id, second) in zip(handshakes[1:], answered[1:]):
        table.accept(handshake_id, handshake.finish(second)[0])
