"""heclave's wire protocol: messages, transport, identities, secure channel, attestation evidence, errors."""

from .errors import (
    AttestationError,
    ChannelError,
    CiphertextError,
    ErrorCode,
    ForbiddenError,
    HeclaveError,
    IntegrityError,
    NoReplyError,
    PlanError,
    ProtocolError,
    QuotaError,
    RemoteError,
    UnavailableError,
)
from .identity import Identity
from .messages import PROTOCOL_VERSION, Message

__all__ = [
    "AttestationError",
    "ChannelError",
    "CiphertextError",
    "ErrorCode",
    "ForbiddenError",
    "HeclaveError",
    "Identity",
    "IntegrityError",
    "Message",
    "NoReplyError",
    "PROTOCOL_VERSION",
    "PlanError",
    "ProtocolError",
    "QuotaError",
    "RemoteError",
    "UnavailableError",
]
