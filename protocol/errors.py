"""heclave's exceptions and the stable error codes that cross the wire.

Every failure a party can see is one of a few exception classes, each carrying a
stable :class:`ErrorCode` and a sentence that says what to do. Error replies on
the wire carry the same code and sentence, so a client re-raises exactly what
the remote side raised.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Stable error codes; their string values are part of the wire protocol."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    INCOMPLETE = "incomplete"
    BAD_FIELD = "bad_field"
    BAD_CIPHERTEXT = "bad_ciphertext"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_SESSION = "unknown_session"
    UNKNOWN_REQUEST = "unknown_request"
    OUT_OF_ORDER = "out_of_order"
    INTEGRITY = "integrity"
    CHANNEL = "channel"
    ATTESTATION = "attestation"
    PLAN = "plan"
    ENCLAVE_UNAVAILABLE = "enclave_unavailable"
    TIMEOUT = "timeout"
    BUSY = "busy"
    QUOTA = "quota"
    FORBIDDEN = "forbidden"
    INTERNAL = "internal"


class HeclaveError(Exception):
    """Base class of every error heclave raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProtocolError(HeclaveError):
    """A message was malformed, too large, of an unknown type or version."""

    code = ErrorCode.BAD_MESSAGE


class ChannelError(HeclaveError):
    """A secure-channel envelope failed authentication, or arrived out of order.

    The message deliberately does not say which check failed.
    """

    code = ErrorCode.CHANNEL


class AttestationError(HeclaveError):
    """The enclave's evidence does not satisfy the verifier's policy."""

    code = ErrorCode.ATTESTATION


class PlanError(HeclaveError):
    """A model cannot be imported or planned; the message names the layer."""

    code = ErrorCode.PLAN


class CiphertextError(HeclaveError):
    """A ciphertext frame is not a valid ciphertext for the expected parameters."""

    code = ErrorCode.BAD_CIPHERTEXT


class IntegrityError(HeclaveError):
    """The server's result for a layer is not that layer applied to the request's activation.

    The enclave ended the request and released nothing; the message never
    says which check failed or by how much.
    """

    code = ErrorCode.INTEGRITY


class QuotaError(HeclaveError):
    """An identity reached its own limit (sessions, models, requests in flight) or the enclave its ceiling."""

    code = ErrorCode.QUOTA


class ForbiddenError(HeclaveError):
    """The identity behind the session may not do this (query a model it is not listed for, undeploy
    another identity's model)."""

    code = ErrorCode.FORBIDDEN


class RemoteError(HeclaveError):
    """An error reply received from another process, re-raised locally."""


class UnavailableError(HeclaveError):
    """A peer did not answer within its timeout, or is not running."""

    code = ErrorCode.TIMEOUT


class NoReplyError(UnavailableError):
    """This process's own request got no reply at all within its timeout (nothing came back)."""


_BY_CODE: dict[ErrorCode, type[HeclaveError]] = {
    ErrorCode.CHANNEL: ChannelError,
    ErrorCode.ATTESTATION: AttestationError,
    ErrorCode.PLAN: PlanError,
    ErrorCode.BAD_CIPHERTEXT: CiphertextError,
    ErrorCode.INTEGRITY: IntegrityError,
    ErrorCode.QUOTA: QuotaError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.TIMEOUT: UnavailableError,
    ErrorCode.ENCLAVE_UNAVAILABLE: UnavailableError,
}


def error_from_reply(code: str, message: str) -> HeclaveError:
    """Rebuild the exception a remote process reported in an error reply."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return RemoteError(f"{message} (unrecognised error code {code!r})", ErrorCode.INTERNAL)
    return _BY_CODE.get(known, RemoteError)(message, known)
