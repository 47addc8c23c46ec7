"""Request/reply over ZeroMQ: a DEALER client with timeouts and a ROUTER serving loop.

Every request gets exactly one reply. The serving loop turns any failure while
handling a message into an ``error`` reply and goes on serving; it never lets
a bad message end the process.

Who may connect is decided at the CURVE handshake, before any message
(``protocol.curve``): a CURVE ROUTER accepts the client keys of its allow list,
or any key without one, and each message it receives carries its sender's key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import zmq

from . import link
from .curve import AllowedKeys, CurveKeys, client_key, vet_clients
from .errors import ErrorCode, HeclaveError, NoReplyError, ProtocolError
from .messages import (
    MAX_BUFFER_BYTES,
    MAX_BUFFERS,
    MAX_MESSAGE_BYTES,
    Message,
    decode,
    encode,
    error_message,
    size_of,
    too_large,
    try_parse_id,
)
from .storage import PUBLIC_MODE, write_atomic

log = logging.getLogger(__name__)

# Buffers above messages.MAX_BUFFER_BYTES get a ``too_large`` reply; the socket itself drops a peer
# that sends a frame above HARD_FRAME_BYTES, which bounds what one message can cost before refusal.
HARD_FRAME_BYTES = 4 * MAX_BUFFER_BYTES
DEFAULT_TIMEOUT_S = 120.0


def write_public_key(path: Path, key: bytes) -> None:
    """Write a CURVE public key where parties can pin it: atomically, readable by all (it is public)."""
    write_atomic(path, key + b"\n", PUBLIC_MODE)


def read_public_key(path: Path) -> bytes:
    """Read a pinned CURVE public key written by :func:`write_public_key`."""
    key = path.read_bytes().strip()
    if len(key) != 40:
        raise ProtocolError(f"{path} does not hold a 40-character Z85 CURVE public key.", ErrorCode.BAD_FIELD)
    return key


class Client:
    """A DEALER socket that sends one request at a time and waits for its reply.

    With ``server_key`` it speaks CURVE to a server holding that (pinned) key,
    authenticating as ``client_keys`` where the server keeps an allow list, or
    as a throwaway pair made here when the server accepts any client. With
    ``link_token`` it presents that token instead (the server's link to the
    enclave, ``protocol.link``).
    """

    def __init__(
        self,
        endpoint: str,
        server_key: bytes | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context: zmq.Context | None = None,
        client_keys: CurveKeys | None = None,
        link_token: bytes | None = None,
    ) -> None:
        if client_keys is not None and server_key is None:
            raise ProtocolError(
                "CURVE client keys need the server's public key too: pass server_key.", ErrorCode.BAD_FIELD
            )
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_BYTES)
        if server_key is not None:
            own = client_keys or CurveKeys.generate()
            self._socket.curve_serverkey = server_key
            self._socket.curve_publickey = own.public
            self._socket.curve_secretkey = own.secret
        elif link_token is not None:
            link.present(self._socket, link_token)
        self._socket.connect(endpoint)

    def request(self, message: Message, timeout_s: float | None = None) -> Message:
        """Send ``message`` and return its reply, raising the remote error if any."""
        frames = encode(message)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        # A DEALER with no connected peer (a refused handshake drops it) blocks on send: bound that wait too.
        self._socket.setsockopt(zmq.SNDTIMEO, max(1, int((timeout_s or self.timeout_s) * 1000)))
        try:
            self._socket.send_multipart(frames, copy=False)
        except zmq.Again:
            raise NoReplyError(
                f"Could not send {message.type!r} to {self.endpoint} within {timeout_s or self.timeout_s:.0f} s: "
                "no connection was accepted; check the address, the server's key and that this client is allowed."
            ) from None
        self.bytes_sent += size_of(frames)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(int(remaining * 1000)):
                raise NoReplyError(
                    f"No reply from {self.endpoint} to {message.type!r} within {timeout_s or self.timeout_s:.0f} s; "
                    "check that the process is running and the address is right."
                )
            reply_frames = self._socket.recv_multipart()
            self.bytes_received += size_of(reply_frames)
            reply = decode(reply_frames)
            if reply.parent == message.id:
                return reply.raise_for_error()
            log.debug("discarding stale reply to %s", reply.parent)

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Handler = Callable[[Message], Message]


def dispatch(handlers: dict[str, Handler], request: Message, service: str) -> Message:
    """Route a request to the handler of its type, refusing unknown types with the list of known ones."""
    handler = handlers.get(request.type)
    if handler is None:
        raise ProtocolError(
            f"The {service} does not handle {request.type!r}; it handles {', '.join(handlers)}.",
            ErrorCode.UNKNOWN_TYPE,
        )
    return handler(request)


def router(
    endpoint: str,
    curve: CurveKeys | None = None,
    context: zmq.Context | None = None,
    allow: AllowedKeys | None = None,
    link_token: bytes | None = None,
) -> tuple[zmq.Socket, str]:
    """Bind a ROUTER socket; return it and its real endpoint.

    With ``curve`` it is a CURVE server, and the context's ZAP handler (pyzmq's
    ``zmq.auth``) vets each client's key at the handshake: only the keys in
    ``allow``, or any key without it. A refused client gets no reply at all,
    and every accepted message carries its sender's key
    (``protocol.curve.client_key``). With ``link_token`` instead it admits
    only clients presenting that token (``protocol.link``).
    """
    if allow is not None and curve is None:
        raise ProtocolError("An allow list needs CURVE: pass the socket's curve keys.", ErrorCode.BAD_FIELD)
    sock = (context or zmq.Context.instance()).socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_BYTES)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    if curve is not None:
        vet_clients(sock, allow)
        sock.curve_server = True
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
    elif link_token is not None:
        link.guard(sock, link_token)
    sock.bind(endpoint)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def handle_frames(frames: list[bytes], handler: Handler) -> list[bytes]:
    """Decode a request, run the handler and encode exactly one reply, whatever happens."""
    request: Message | None = None
    try:
        request = decode(frames)
        reply = handler(request)
    except HeclaveError as exc:
        reply = error_message(exc, request.id if request else try_parse_id(frames))
    except Exception as exc:
        # Only the exception type is logged: messages of numerical libraries can quote data.
        log.error("internal error handling %s: %s", request.type if request else "?", type(exc).__name__)
        reply = error_message(
            HeclaveError(f"Internal error ({type(exc).__name__}); the request was not processed.", ErrorCode.INTERNAL),
            request.id if request else try_parse_id(frames),
        )
    return encode(reply)


class Received(NamedTuple):
    """One message as :func:`receive` read it."""

    routing: bytes
    frames: list[bytes]
    refusal: list[bytes] | None
    client: str
    """The Z85 CURVE key the sender connected with (``""`` without CURVE): who the transport knows it as."""


def receive(sock: zmq.Socket) -> Received:
    """One message from a ROUTER socket, read frame by frame: the sender's routing id, the frames, the
    ``too_large`` reply to send instead of handling them when the message is over its limits, and the
    sender's CURVE key.

    A message may hold ``MAX_MESSAGE_BYTES`` in all and ``MAX_BUFFERS`` buffers. Past either, its
    remaining frames are taken off the socket and dropped one by one (only the header stays, so the
    reply can name the request), and the loop goes on serving. libzmq hands a multipart message over
    only once its last frame has arrived, so it has buffered the whole message by then (each frame at
    most ``HARD_FRAME_BYTES``): the limit bounds what this process copies and handles, not that buffer.
    """
    identity = sock.recv()
    frames: list[bytes] = []
    total = count = 0
    over = False
    client = ""
    while sock.getsockopt(zmq.RCVMORE):
        frame = sock.recv(copy=False)
        client = client or client_key(frame)
        total, count = total + len(frame), count + 1
        over = total > MAX_MESSAGE_BYTES or count > 1 + MAX_BUFFERS
        if over:
            del frames[1:]
        else:
            frames.append(frame.bytes)
    if not over:
        return Received(identity, frames, None, client)
    buffers = f"{count - 1} buffers exceed the limit of {MAX_BUFFERS}."
    reason = too_large(total) if total > MAX_MESSAGE_BYTES else buffers
    refusal = error_message(ProtocolError(reason, ErrorCode.TOO_LARGE), try_parse_id(frames))
    return Received(identity, frames, encode(refusal), client)


def serve(
    sock: zmq.Socket,
    handler: Handler,
    should_stop: Callable[[], bool] = lambda: False,
    idle: Callable[[], bool] = lambda: False,
) -> None:
    """Answer requests on a bound ROUTER socket until ``should_stop`` returns true.

    Between requests ``idle`` may do background work in small steps; it returns
    true while it has more to do, and a waiting request always comes first.
    """
    busy = True
    while not should_stop():
        if not sock.poll(0 if busy else 200):
            busy = idle()
            continue
        got = receive(sock)
        sock.send_multipart([got.routing, *(got.refusal or handle_frames(got.frames, handler))], copy=False)
        busy = True  # a request may have used up precomputed work: refill in the next gap
