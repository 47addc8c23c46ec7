"""Resource limits that hold at the transport and on disk: a bound on a whole message and on its number of
buffers, and file writes that are atomic, durable and never follow a planted link.

The attacker's side of the same limits, against the real processes, is in
``tests/attacks/test_5_resources.py``; the bound on SEAL's compressed frames is in
``tests/he/test_sealformat.py``, and the enclave's pads from its CSPRNG in ``tests/tee/test_execution.py``.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import msgpack
import pytest
import zmq

from heclave.protocol import storage, transport
from heclave.protocol.errors import ErrorCode
from heclave.protocol.messages import MAX_BUFFERS, PROTOCOL_VERSION, decode
from heclave.protocol.storage import write_atomic
from heclave.protocol.transport import Received, receive, write_public_key


@pytest.fixture
def pair():
    """A ROUTER and a DEALER connected over loopback TCP, as the serving loops and their clients are."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    dealer.close(linger=0)
    router.close(linger=0)
    context.term()


def _header(nbuf: int, mid: str = "m-1") -> bytes:
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "evidence", "id": mid, "parent": None, "content": {}, "nbuf": nbuf}
    )


def _receive(router) -> Received:
    assert router.poll(20_000)
    return receive(router)


def test_a_message_over_the_total_limit_is_refused_keeping_only_its_header(pair, monkeypatch):
    router, dealer = pair
    monkeypatch.setattr(transport, "MAX_MESSAGE_BYTES", 1 << 20)
    chunk = bytes(300_000)
    dealer.send_multipart([_header(5), *[chunk] * 5])  # 1.5 MB in five buffers, each well within its own limit
    identity, frames, refusal, _ = _receive(router)
    assert frames == [_header(5)]  # the buffers past the limit were dropped as they came
    reply = decode(refusal)
    assert (reply.type, reply.parent, reply.content["code"]) == ("error", "m-1", "too_large")
    assert "1500" in reply.content["message"] and "exceeds" in reply.content["message"]
    dealer.send_multipart([_header(1, "m-2"), chunk])  # the next message is whole again
    _, frames, refusal, _ = _receive(router)
    assert refusal is None and frames == [_header(1, "m-2"), chunk] and decode(frames).id == "m-2"


def test_a_message_of_too_many_buffers_is_refused(pair):
    router, dealer = pair
    dealer.send_multipart([_header(MAX_BUFFERS + 1), *[b"x"] * (MAX_BUFFERS + 1)])
    _, frames, refusal, _ = _receive(router)
    reply = decode(refusal)
    assert reply.content["code"] == "too_large" and f"{MAX_BUFFERS + 1} buffers" in reply.content["message"]
    assert len(frames) == 1


def test_a_message_within_the_limits_arrives_whole(pair):
    router, dealer = pair
    sent = [_header(3), b"", bytes(range(256)) * 1000, b"\x00"]
    dealer.send_multipart(sent)
    identity, frames, refusal, _ = _receive(router)
    assert refusal is None and frames == sent and identity


def test_decode_refuses_a_whole_message_over_the_limit(monkeypatch):
    from heclave.protocol import messages

    monkeypatch.setattr(messages, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(messages.ProtocolError) as refused:
        decode([_header(2), bytes(600), bytes(600)])
    assert refused.value.code is ErrorCode.TOO_LARGE


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "server.key"
    keys = [bytes([65 + i]) * 40 for i in range(8)]
    failures: list[BaseException] = []

    def write(key: bytes) -> None:
        try:
            for _ in range(40):
                write_public_key(path, key)
                assert path.read_bytes() in {k + b"\n" for k in keys}  # whole, never half of one and half of another
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and _temporaries(tmp_path) == []


def test_public_keys_are_world_readable_and_secrets_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_public_key(tmp_path / "public.key", b"k" * 40)
    finally:
        os.umask(0o000)
    try:
        write_atomic(tmp_path / "secret", b"s")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "public.key").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert _temporaries(tmp_path) == []


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: "0" * (2 * n))
    (tmp_path / f".server.key.{'0' * 16}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_public_key(tmp_path / "server.key", b"k" * 40)
    assert victim.read_bytes() == b"untouched" and not (tmp_path / "server.key").exists()


def test_the_rename_is_made_durable_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    write_atomic(tmp_path / "state", b"new")
    assert events == ["fsync file", "rename", "fsync directory"]
    assert (tmp_path / "state").read_bytes() == b"new" and _temporaries(tmp_path) == []

    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "state", b"newer")
    assert (tmp_path / "state").read_bytes() == b"new" and _temporaries(tmp_path) == []
