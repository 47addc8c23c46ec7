"""Streams of bounded frames and sealed chunks, in-process: what the receiver accepts, and everything it refuses."""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from heclave.protocol.channel import EnclaveHandshake, OwnerHandshake, open_chunks, seal_chunks
from heclave.protocol.errors import ChannelError, ErrorCode, HeclaveError
from heclave.protocol.messages import Message, MessageType
from heclave.protocol.noise import public_bytes
from heclave.protocol.streams import CHUNK_BYTES, PART_BYTES, Incoming, StreamTable, frames_of, parts_of, send

LARGE = 2 * CHUNK_BYTES + 12345


@pytest.fixture(scope="module")
def items() -> list[bytes]:
    """Small items (ciphertext-sized), an empty one, and one that takes three chunks."""
    return [secrets.token_bytes(300_000) for _ in range(5)] + [b"", secrets.token_bytes(LARGE), b"tail"]


def _refused(code: ErrorCode, call, *args) -> HeclaveError:
    with pytest.raises(HeclaveError) as info:
        call(*args)
    assert info.value.code is code, info.value.message
    return info.value


def test_items_travel_as_bounded_frames_and_parts_and_come_back_whole(items):
    frames = list(frames_of(items))
    assert len(frames) == len(items) + 2 and max(len(f) for f in frames) == CHUNK_BYTES
    parts = list(parts_of(items))
    assert all(sum(len(f) for f in part) <= PART_BYTES for part in parts) and len(parts) == 4
    incoming = Incoming([len(i) for i in items], 1 << 30, "test stream")
    done = [incoming.accept(k, [bytes(f) for f in part]) for k, part in enumerate(parts)]
    assert done == [False] * (len(parts) - 1) + [True]
    assert incoming.items == items and incoming.received == incoming.total == sum(map(len, items))


def test_no_items_are_one_empty_part():
    assert list(parts_of([])) == [[]]
    assert Incoming([], 10, "test stream").accept(0, [])


@pytest.mark.parametrize(
    "sizes, code",
    [([1 << 20, 1 << 20], ErrorCode.TOO_LARGE), ("many", ErrorCode.BAD_FIELD), ([5, -1], ErrorCode.BAD_FIELD)],
)
def test_a_declaration_past_the_limit_or_malformed_is_refused_before_anything_is_kept(sizes, code):
    _refused(code, Incoming, sizes, 1 << 20, "test stream")


def test_a_part_out_of_order_a_frame_of_another_size_or_one_too_many_is_refused(items):
    parts = [[bytes(f) for f in part] for part in parts_of(items)]
    sizes = [len(i) for i in items]
    _refused(ErrorCode.INCOMPLETE, Incoming(sizes, 1 << 30, "s").accept, 1, parts[1])
    _refused(ErrorCode.INCOMPLETE, Incoming(sizes, 1 << 30, "s").accept, 0, [parts[0][0][:-1], *parts[0][1:]])
    _refused(ErrorCode.INCOMPLETE, Incoming(sizes, 1 << 30, "s").accept, 0, [])
    whole = Incoming(sizes, 1 << 30, "s")
    for k, part in enumerate(parts):
        whole.accept(k, part)
    _refused(ErrorCode.INCOMPLETE, whole.accept, len(parts), [b"x"])


def test_the_table_finishes_a_stream_once_and_keeps_senders_apart(items):
    table = StreamTable(capacity=1 << 30)
    finished = []

    def finish(request: Message, got: list[bytes]) -> Message:
        finished.append(got)
        return request.reply({"done": True})

    def request(message: Message) -> Message:
        if message.type == MessageType.PART:
            return table.part("owner", message)
        incoming = Incoming(message.content["sizes"], 1 << 30, "s")
        return message.reply({"stream": table.begin("owner", "model", incoming, finish)})

    told = []
    reply = send(request, Message(MessageType.DEPLOY), items, lambda done, total: told.append((done, total)))
    assert reply.content == {"done": True} and finished == [items] and len(table) == 0
    assert told[-1] == (sum(map(len, items)),) * 2
    stream = table.begin("owner", "model", Incoming([3], 10, "s"), finish)
    stranger = Message(MessageType.PART, {"stream": stream, "part": 0}, [b"abc"])
    _refused(ErrorCode.INCOMPLETE, table.part, "stranger", stranger)
    again = table.begin("owner", "model", Incoming([3], 10, "s"), finish)  # replaces the stream in progress
    _refused(ErrorCode.INCOMPLETE, table.part, "owner", stranger)
    assert table.part("owner", Message(MessageType.PART, {"stream": again, "part": 0}, [b"abc"])).content["done"]


def test_the_table_bounds_streams_per_sender_and_declared_bytes():
    table = StreamTable(capacity=100, per_sender=2)
    table.begin("a", "1", Incoming([10], 100, "s"), None)
    table.begin("a", "2", Incoming([10], 100, "s"), None)
    _refused(ErrorCode.QUOTA, table.begin, "a", "3", Incoming([10], 100, "s"), None)
    _refused(ErrorCode.BUSY, table.begin, "b", "1", Incoming([90], 100, "s"), None)


def _sessions():
    enclave_key, owner_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    owner = OwnerHandshake(owner_key, public_bytes(enclave_key), b"evidence")
    enclave = EnclaveHandshake(enclave_key, b"evidence")
    third, owner_session = owner.finish(enclave.answer(owner.first()))
    return owner_session, enclave.accept(third)


def test_sealed_chunks_open_whole_and_a_total_past_the_limit_or_a_wrong_count_opens_nothing():
    payload = secrets.token_bytes(LARGE)
    owner, enclave = _sessions()
    envelopes = seal_chunks(owner, payload, b"register")
    assert len(envelopes) == 3
    _refused(ErrorCode.TOO_LARGE, open_chunks, enclave, envelopes, b"register", LARGE, LARGE - 1)
    _refused(ErrorCode.INCOMPLETE, open_chunks, enclave, envelopes[:2], b"register", LARGE, LARGE)
    assert open_chunks(enclave, envelopes, b"register", LARGE, LARGE) == payload


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: ([e[1], e[0], e[2]], LARGE),
        lambda e: ([e[0], e[0], e[2]], LARGE),
        lambda e: (e[:2], 2 * CHUNK_BYTES),
        lambda e: ([e[0], e[1], e[2][:-1]], LARGE),
        lambda e: (e, LARGE - 1),
    ],
    ids=["reordered", "repeated", "cut after a chunk", "cut inside a chunk", "another total"],
)
def test_sealed_chunks_reordered_repeated_or_cut_are_refused(tamper):
    owner, enclave = _sessions()
    envelopes, total = tamper(seal_chunks(owner, secrets.token_bytes(LARGE), b"register"))
    with pytest.raises(ChannelError):
        open_chunks(enclave, envelopes, b"register", total, LARGE)
