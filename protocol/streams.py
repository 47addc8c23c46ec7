"""Large objects as streams of bounded messages: sizes declared first, then the frames, checked as they come.

A model's weights or a worker's bundle can be hundreds of MB: as one buffer
it would pass ``messages.MAX_BUFFER_BYTES``, and as one message both ends would
hold all of it at once (libzmq hands a message over only once all of it has
arrived). So the sender *begins* a stream with a message declaring the size
of every item it will send (a ciphertext, a matrix, a public context), and the
receiver checks the count and the total against its limit before it keeps a
byte. Then ``part`` messages follow in order, each at most ``PART_BYTES``:
the next frames, every frame a whole item or a ``CHUNK_BYTES`` chunk of a
larger one. The receiver checks each part's number and each frame's size
against the declaration as it arrives; anything else ends the stream with
``incomplete`` and the sender begins again. Items are bytes, parsed only by
whoever asked for them: nothing is unpickled or evaluated here.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .errors import ErrorCode, HeclaveError, ProtocolError, QuotaError
from .messages import Message, MessageType, field_of

CHUNK_BYTES = 16 << 20
"""The largest frame of a stream: an item larger than this travels as several chunks of it."""
PART_BYTES = 16 << 20
"""The most one ``part`` message carries: many ciphertexts, or one chunk."""
MAX_ITEMS = 1 << 20
IDLE_S = 300.0
"""A stream that got no part for this long is dropped, with whatever it had received, when another begins."""
PER_SENDER = 8

Progress = Callable[[int, int], None]
"""Told after each part: bytes sent so far, bytes in all."""


def _incomplete(sentence: str) -> HeclaveError:
    return HeclaveError(f"{sentence} The stream was dropped; begin it again.", ErrorCode.INCOMPLETE)


def chunk_count(size: int) -> int:
    """How many frames carry an item of ``size`` bytes: one, or its ``CHUNK_BYTES`` chunks."""
    return max(1, -(-size // CHUNK_BYTES))


def chunks_of(item: bytes) -> Iterator[memoryview]:
    """The frames that carry one item: the item whole, or its ``CHUNK_BYTES`` chunks (views, not copies)."""
    view = memoryview(item)
    return (view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES] for i in range(chunk_count(len(view))))


def frames_of(items: Iterable[bytes]) -> Iterator[memoryview]:
    """The frames that carry ``items``, in order."""
    for item in items:
        yield from chunks_of(item)


def parts_of(items: Iterable[bytes]) -> Iterator[list[memoryview]]:
    """The frames of ``items`` grouped into parts of at most ``PART_BYTES``; one empty part if there are none."""
    batch: list[memoryview] = []
    size = 0
    for frame in frames_of(items):
        if batch and size + len(frame) > PART_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(frame)
        size += len(frame)
    yield batch


def send(
    request: Callable[[Message], Message], begin: Message, items: Sequence[bytes], progress: Progress | None = None
) -> Message:
    """Begin a stream with ``begin`` (its content gets the items' ``sizes``), send ``items`` in parts through
    ``request``, and return the reply to the last part: the receiver's answer to the whole."""
    sizes = [len(item) for item in items]
    reply = request(Message(begin.type, {**begin.content, "sizes": sizes}))
    stream = field_of(reply.content, "stream", str)
    total, sent = sum(sizes), 0
    for index, frames in enumerate(parts_of(items)):
        reply = request(Message(MessageType.PART, {"stream": stream, "part": index}, frames))
        sent += sum(len(f) for f in frames)
        if progress is not None:
            progress(sent, total)
    return reply


def declared_sizes(sizes: object, limit: int, what: str) -> list[int]:
    """A stream's declared item sizes, refused (``too_large``) when they add up past ``limit``: before any
    byte of it is kept."""
    if not isinstance(sizes, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
        raise ProtocolError(f"Field 'sizes' of the {what} must be a list of byte counts.", ErrorCode.BAD_FIELD)
    if len(sizes) > MAX_ITEMS:
        raise ProtocolError(f"The {what} declares {len(sizes)} items, more than {MAX_ITEMS}.", ErrorCode.TOO_LARGE)
    total = sum(sizes)
    if total > limit:
        raise ProtocolError(
            f"The {what} declares {total} bytes, more than the {limit} accepted; nothing was kept. "
            "Make the model smaller, or split it into several.",
            ErrorCode.TOO_LARGE,
        )
    return sizes


class Incoming:
    """One stream being received: its declared sizes, the next part it expects, and the items complete so far."""

    def __init__(self, sizes: object, limit: int, what: str) -> None:
        self.sizes = declared_sizes(sizes, limit, what)
        self.total = sum(self.sizes)
        self.what = what
        self.items: list[bytes] = []
        self.received = 0
        self.next_part = 0
        self._chunks: list[bytes] = []  # of the item being put together
        self._held = 0

    @property
    def complete(self) -> bool:
        return len(self.items) == len(self.sizes)

    def accept(self, part: int, frames: Sequence[bytes]) -> bool:
        """Take part number ``part``; true once every declared item is complete."""
        if part != self.next_part:
            raise _incomplete(f"The {self.what} expected part {self.next_part}, not part {part}.")
        if sum(len(f) for f in frames) > PART_BYTES:
            raise _incomplete(f"A part of the {self.what} holds more than {PART_BYTES} bytes.")
        if not frames and not self.complete:
            raise _incomplete(f"A part of the {self.what} carries no frames.")
        for frame in frames:
            if self.complete:
                raise _incomplete(f"The {self.what} got more frames than its {len(self.sizes)} items declared.")
            size = self.sizes[len(self.items)]
            expected = min(CHUNK_BYTES, size - self._held)
            if len(frame) != expected:
                raise _incomplete(
                    f"Item {len(self.items)} of the {self.what} expected a frame of {expected} bytes, got {len(frame)}."
                )
            self.received += len(frame)
            if expected == size:
                self.items.append(frame)
                continue
            self._chunks.append(frame)
            self._held += len(frame)
            if self._held == size:
                # The chunks go as the joined item is made: one large item's copy at a time, not the stream's.
                self.items.append(b"".join(self._chunks))
                self._chunks, self._held = [], 0
        self.next_part += 1
        return self.complete


Finish = Callable[[Message, list[bytes]], Message]
"""Called with the last part's request and the stream's items; its reply answers that part."""


@dataclass
class _Stream:
    sender: str
    key: str
    incoming: Incoming
    finish: Finish
    touched: float = field(default_factory=time.monotonic)


class StreamTable:
    """The streams a process is receiving, by id: at most ``per_sender`` open per sender, one per sender and
    ``key`` (beginning again replaces the one in progress), at most ``capacity`` bytes declared by all of them
    together, and each dropped, when another begins, once it went ``idle_s`` without a part (an owner that
    disappeared midway).

    Streams of different senders proceed at once on the server's lanes: the table's lock makes taking a
    part atomic, and the ``finish`` of a complete stream runs outside it.
    """

    def __init__(self, capacity: int, per_sender: int = PER_SENDER, idle_s: float = IDLE_S) -> None:
        self.capacity, self.per_sender, self.idle_s = capacity, per_sender, idle_s
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()

    def begin(self, sender: str, key: str, incoming: Incoming, finish: Finish) -> str:
        """Open a stream for ``incoming``; returns the id its parts name."""
        with self._lock:
            now = time.monotonic()
            for stream_id, stream in list(self._streams.items()):
                if now - stream.touched > self.idle_s or (stream.sender, stream.key) == (sender, key):
                    del self._streams[stream_id]
            if sum(1 for s in self._streams.values() if s.sender == sender) >= self.per_sender:
                raise QuotaError(
                    f"This client is sending {self.per_sender} streams already; finish one, or wait "
                    f"{self.idle_s:.0f} s until an abandoned one is dropped."
                )
            if sum(s.incoming.total for s in self._streams.values()) + incoming.total > self.capacity:
                raise HeclaveError(
                    "The streams in progress hold all the memory this process gives them; retry in a moment.",
                    ErrorCode.BUSY,
                )
            stream_id = secrets.token_hex(16)
            self._streams[stream_id] = _Stream(sender, key, incoming, finish)
            return stream_id

    def part(self, sender: str, request: Message) -> Message:
        """Take a ``part`` message: the receipt, or once the stream is complete, its ``finish``'s reply."""
        stream_id = field_of(request.content, "stream", str)
        index = field_of(request.content, "part", int)
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or stream.sender != sender:
                raise _incomplete(f"No stream {stream_id!r} is open for this client: it ended, failed or idled out.")
            try:
                complete = stream.incoming.accept(index, request.buffers)
            except HeclaveError:
                del self._streams[stream_id]
                raise
            stream.touched = time.monotonic()
            if complete:
                del self._streams[stream_id]
        if not complete:
            return request.reply({"received": stream.incoming.received, "total": stream.incoming.total})
        return stream.finish(request, stream.incoming.items)

    def drop(self, key: str) -> None:
        """Forget the streams of ``key`` (a model undeployed while its weights arrived)."""
        with self._lock:
            for stream_id in [i for i, s in self._streams.items() if s.key == key]:
                del self._streams[stream_id]

    def __len__(self) -> int:
        return len(self._streams)
