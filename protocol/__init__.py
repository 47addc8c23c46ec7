"""heclave's wire protocol: messages, transport, secure channel, attestation evidence, errors."""

from .errors import (
    AttestationError,
    ChannelError,
    CiphertextError,
    ErrorCode,
    HeclaveError,
    IntegrityError,
    NoReplyError,
    PlanError,
    ProtocolError,
    RemoteError,
    UnavailableError,
)
from .messages import PROTOCOL_VERSION, Message

__all__ = [
    "AttestationError",
    "ChannelError",
    "CiphertextError",
    "ErrorCode",
    "HeclaveError",
    "IntegrityError",
    "Message",
    "NoReplyError",
    "PROTOCOL_VERSION",
    "PlanError",
    "ProtocolError",
    "RemoteError",
    "UnavailableError",
]
