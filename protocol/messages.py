"""Wire messages: a msgpack header frame followed by raw binary frames.

A message is a ZeroMQ multipart ``[header, *buffers]``. The header is a msgpack
map ``{v, type, id, parent, content, nbuf}``; ciphertexts and other bulk data
travel as the raw ``buffers``, never inside msgpack and never pickled. A reply
carries the id of the request it answers in ``parent`` (as jupyter_client's
``parent_header`` does), and is either ``ok`` or ``error``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from .errors import ErrorCode, HeclaveError, ProtocolError, error_from_reply

# 2: a model's weights and bundles travel as streams of parts, its secrets sealed in chunks (protocol.streams).
PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 1 << 20
MAX_BUFFERS = 8192
MAX_BUFFER_BYTES = 64 << 20
# A whole message, header and buffers. A model's weights and bundle travel as streams of parts of at most
# 16 MB (``protocol.streams``); the largest honest message is a model's secrets sealed to the enclave
# (``register``, at most 512 MB in 16 MB envelopes; 62 MB for Orion's LeNet). Without this limit, 8192
# buffers of 64 MB would be 512 GiB.
MAX_MESSAGE_BYTES = 1 << 30
OK = "ok"
ERROR = "error"


class MessageType(StrEnum):
    """Every request type, by the process that answers it; a reply is ``ok`` or ``error``.

    Each process routes on these (``transport.dispatch``) and refuses any other
    type naming the ones it handles. Sealed payloads are described where they
    are opened: ``tee.enclave`` for the enclave, ``parties.server`` for the server.
    """

    # The enclave answers these; the server relays those a client sends.
    EVIDENCE = "evidence"  # the enclave's attestation evidence and public CKKS parameters
    OPEN_SESSION = "open_session"  # Noise XK message 1; the reply carries message 2
    CONFIRM_SESSION = "confirm_session"  # Noise XK message 3: the owner proves its identity
    REGISTER_MODEL = "register_model"  # from the server: a model's graph and the owner's sealed secrets
    GRANT = "grant"  # the owner replaces who may query its model
    UNDEPLOY = "undeploy"  # the owner removes its model and its keys
    MODEL_INFO = "model_info"  # a reader asks for a model's public context, sealed to its session
    BEGIN = "begin"  # from the server: an inference's first stage, checked against the data owner's seal
    ACTIVATE = "activate"  # from the server: one stage's result, for the next stage's input or the release
    # The server answers these.
    REGISTER = "register"  # a model owner registers a graph; the enclave makes its keys
    DEPLOY = "deploy"  # the model owner declares the registered model's weights; they follow as parts
    INFER = "infer"  # a data owner's encrypted batch and its sealed authorisation
    # A worker answers these, from its server.
    INSTALL = "install"  # a deployment's bundle (graph, public context, weights) declared; it follows as parts
    UNINSTALL = "uninstall"  # forget a model: undeployed, or its deployment failed
    EVALUATE = "evaluate"  # one stage of one batch
    # The server and the workers answer this: the next frames of a stream begun by deploy or install.
    PART = "part"


@dataclass(frozen=True)
class Message:
    """One protocol message: its type, content map, binary buffers and ids."""

    type: str  # a MessageType, or ok or error
    content: dict[str, Any] = field(default_factory=dict)
    buffers: Sequence[bytes] = ()
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    parent: str | None = None

    def reply(self, content: dict[str, Any] | None = None, buffers: Sequence[bytes] = ()) -> Message:
        """An ``ok`` reply to this message."""
        return Message(OK, content or {}, tuple(buffers), parent=self.id)

    def error_reply(self, error: HeclaveError) -> Message:
        """An ``error`` reply carrying the error's stable code and sentence."""
        return error_message(error, parent=self.id)

    def raise_for_error(self) -> Message:
        """Raise the remote error if this is an error reply; return self otherwise."""
        if self.type == ERROR:
            raise error_from_reply(str(self.content.get("code")), str(self.content.get("message")))
        return self


def error_message(error: HeclaveError, parent: str | None) -> Message:
    """An ``error`` message for ``error``, answering ``parent`` when known."""
    return Message(ERROR, {"code": error.code.value, "message": error.message}, (), parent=parent)


def encode(message: Message) -> list[bytes]:
    """Serialise a message into ZeroMQ frames."""
    header = {
        "v": PROTOCOL_VERSION,
        "type": message.type,
        "id": message.id,
        "parent": message.parent,
        "content": message.content,
        "nbuf": len(message.buffers),
    }
    return [msgpack.packb(header, use_bin_type=True), *[bytes(b) for b in message.buffers]]


def decode(frames: Sequence[bytes]) -> Message:
    """Parse ZeroMQ frames into a message, refusing anything malformed.

    Raises :class:`ProtocolError` with a stable code; it never evaluates or
    unpickles anything from the frames.
    """
    if not frames:
        raise ProtocolError("Empty message: send a msgpack header frame first.")
    head = frames[0]
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"Header frame of {len(head)} bytes exceeds {MAX_HEADER_BYTES}; send bulk data as buffers.",
            ErrorCode.TOO_LARGE,
        )
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"Header frame is not valid msgpack ({type(exc).__name__}).") from None
    if not isinstance(header, dict):
        raise ProtocolError("Header frame must be a msgpack map with keys v, type, id, content, nbuf.")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"Protocol version {version!r} is not supported; this peer speaks version {PROTOCOL_VERSION}. "
            "Upgrade the older side.",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    kind, mid, parent = header.get("type"), header.get("id"), header.get("parent")
    content, nbuf = header.get("content", {}), header.get("nbuf")
    if not isinstance(kind, str) or not isinstance(mid, str) or not (parent is None or isinstance(parent, str)):
        raise ProtocolError(
            "Header fields 'type' and 'id' must be strings, 'parent' a string or nil.", ErrorCode.BAD_FIELD
        )
    if not isinstance(content, dict):
        raise ProtocolError("Header field 'content' must be a map.", ErrorCode.BAD_FIELD)
    if not isinstance(nbuf, int) or nbuf != len(frames) - 1:
        raise ProtocolError(
            f"Header announces {nbuf!r} buffers but {len(frames) - 1} followed; the message was truncated or padded.",
            ErrorCode.BAD_FIELD,
        )
    if nbuf > MAX_BUFFERS:
        raise ProtocolError(f"{nbuf} buffers exceed the limit of {MAX_BUFFERS}.", ErrorCode.TOO_LARGE)
    total = size_of(frames)
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(too_large(total), ErrorCode.TOO_LARGE)
    largest = max((len(f) for f in frames[1:]), default=0)
    if largest > MAX_BUFFER_BYTES:
        raise ProtocolError(
            f"A buffer of {largest} bytes exceeds the limit of {MAX_BUFFER_BYTES}; split the data into "
            "more buffers (one ciphertext each).",
            ErrorCode.TOO_LARGE,
        )
    return Message(kind, content, tuple(bytes(f) for f in frames[1:]), mid, parent)


def too_large(total: int) -> str:
    """The sentence refusing a message of ``total`` bytes, more than ``MAX_MESSAGE_BYTES``."""
    return (
        f"A message of {total} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes for one message; "
        "send at most that much in one message."
    )


def try_parse_id(frames: Sequence[bytes]) -> str | None:
    """Best-effort request id of a malformed message, so its error reply can name it."""
    try:
        header = msgpack.unpackb(frames[0], raw=False, max_bin_len=MAX_HEADER_BYTES)
        mid = header.get("id") if isinstance(header, dict) else None
        return mid if isinstance(mid, str) else None
    except Exception:
        return None


def field_of(content: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A required content field of the given type, or a :class:`ProtocolError` naming it."""
    if name not in content:
        raise ProtocolError(f"Missing field {name!r}.", ErrorCode.BAD_FIELD)
    value = content[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"Field {name!r} must be {names}, got {type(value).__name__}.", ErrorCode.BAD_FIELD)
    return value


MAX_BATCH = 256


def batch_size(content: dict[str, Any]) -> int:
    """The number of queries a request carries (``batch``, default 1), within ``MAX_BATCH``."""
    batch = content.get("batch", 1)
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH:
        raise ProtocolError(f"Field 'batch' must be an integer from 1 to {MAX_BATCH}.", ErrorCode.BAD_FIELD)
    return batch


def size_of(frames: Iterable[bytes]) -> int:
    """Total bytes of a list of frames."""
    return sum(len(f) for f in frames)
