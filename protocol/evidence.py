"""Attestation evidence: what the enclave presents, and the owners' policy for accepting it.

The enclave binds its X25519 identity key and its public CKKS context into the
64-byte report data: ``sha256(identity_public || sha256(public_parameters))``
followed by 32 zero bytes. An owner that accepts the evidence therefore knows
which keys it is about to trust. Three runtimes exist: ``gramine-sgx`` (a DCAP
quote), ``gramine-direct`` and ``native`` (no quote: nothing is attested).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import AttestationError

log = logging.getLogger(__name__)


class Runtime(str, Enum):
    """Where the enclave program runs; only ``gramine-sgx`` yields a quote."""

    NATIVE = "native"
    GRAMINE_DIRECT = "gramine-direct"
    GRAMINE_SGX = "gramine-sgx"


def report_data(identity_public: bytes, public_parameters: bytes) -> bytes:
    """The 64 bytes the enclave writes into its SGX report."""
    inner = hashlib.sha256(public_parameters).digest()
    return hashlib.sha256(identity_public + inner).digest() + bytes(32)


@dataclass(frozen=True)
class Evidence:
    """The enclave's claim about itself, checked by :meth:`VerifierPolicy.verify`."""

    runtime: Runtime
    identity_public: bytes
    report_data: bytes
    quote: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime.value,
            "identity_public": self.identity_public,
            "report_data": self.report_data,
            "quote": self.quote,
        }

    @classmethod
    def from_wire(cls, data: Any) -> Evidence:
        if not isinstance(data, dict):
            raise AttestationError("Evidence must be a map with runtime, identity_public, report_data and quote.")
        try:
            runtime = Runtime(data.get("runtime"))
        except ValueError:
            valid = ", ".join(r.value for r in Runtime)
            raise AttestationError(
                f"Unknown evidence runtime {data.get('runtime')!r}; expected one of {valid}."
            ) from None
        fields = [data.get(k) for k in ("identity_public", "report_data", "quote")]
        if not all(isinstance(f, bytes) for f in fields):
            raise AttestationError("Evidence fields identity_public, report_data and quote must be bytes.")
        return cls(runtime, fields[0], fields[1], fields[2])

    def digest(self) -> bytes:
        """A hash of the whole evidence; secure-channel keys are bound to it."""
        h = hashlib.sha256(b"heclave/v1/evidence")
        for part in (self.runtime.value.encode(), self.identity_public, self.report_data, self.quote):
            h.update(struct.pack(">I", len(part)) + part)
        return h.digest()


@dataclass(frozen=True)
class QuoteFields:
    """The fields of an SGX DCAP quote (version 3) that a policy checks, at their documented offsets."""

    debug: bool
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @classmethod
    def parse(cls, quote: bytes) -> QuoteFields:
        if len(quote) < 432:
            raise AttestationError(f"Quote of {len(quote)} bytes is too short to hold an SGX report body (432 bytes).")
        flags = int.from_bytes(quote[96:104], "little")
        prod_id, svn = struct.unpack_from("<HH", quote, 304)
        return cls(bool(flags & 0x02), quote[112:144], quote[176:208], prod_id, svn, quote[368:432])


@dataclass(frozen=True)
class VerifierPolicy:
    """What an owner accepts. The defaults refuse debug and unattested enclaves.

    ``allowed_tcb`` lists the TCB statuses (from the quote's signature check)
    an owner accepts; anything but ``UpToDate`` means the platform lacks
    security updates.
    """

    mrenclave: bytes | None = None
    mrsigner: bytes | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int = 0
    allow_debug: bool = False
    allow_unattested: bool = False
    pccs_url: str | None = None
    allowed_tcb: tuple[str, ...] = ("UpToDate",)

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> VerifierPolicy:
        """Read a policy file; keyword ``overrides`` (from CLI flags, ``None`` = unset) win."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AttestationError(f"Cannot read the verifier policy {path}: {exc}.") from None
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise AttestationError(
                f"Unknown keys {sorted(unknown)} in {path}; valid keys: {', '.join(cls.__dataclass_fields__)}."
            )
        data |= {k: v for k, v in overrides.items() if v is not None}
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> VerifierPolicy:
        """A policy from plain values: measurements as hex strings, the rest as in the dataclass."""

        def measurement(name: str) -> bytes | None:
            value = data.get(name)
            if value is None or isinstance(value, bytes):
                return value
            try:
                raw = bytes.fromhex(str(value))
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise AttestationError(f"{name} must be 64 hexadecimal characters (32 bytes), got {value!r}.")
            return raw

        try:
            return cls(
                mrenclave=measurement("mrenclave"),
                mrsigner=measurement("mrsigner"),
                isv_prod_id=None if data.get("isv_prod_id") is None else int(data["isv_prod_id"]),
                min_isv_svn=int(data.get("min_isv_svn", 0)),
                allow_debug=bool(data.get("allow_debug", False)),
                allow_unattested=bool(data.get("allow_unattested", False)),
                pccs_url=data.get("pccs_url"),
                allowed_tcb=tuple(data.get("allowed_tcb", ("UpToDate",))),
            )
        except (TypeError, ValueError) as exc:
            raise AttestationError(f"Invalid verifier policy value: {exc}.") from None

    def verify(self, evidence: Evidence, public_parameters: bytes) -> None:
        """Accept the evidence for these public parameters, or raise :class:`AttestationError` naming the check."""
        if evidence.report_data != report_data(evidence.identity_public, public_parameters):
            raise AttestationError(
                "report_data does not bind the identity key and public parameters the server relayed; "
                "the server or enclave substituted keys. Do not send anything to this enclave."
            )
        if evidence.runtime is not Runtime.GRAMINE_SGX:
            if not self.allow_unattested:
                raise AttestationError(
                    f"runtime: the enclave runs as {evidence.runtime.value!r} and presents no SGX quote. "
                    "Run it under gramine-sgx, or, for a development run only, allow an unattested enclave "
                    "(--allow-unattested)."
                )
            log.warning(
                "UNATTESTED ENCLAVE (runtime %s): accepted only because this is a development run; "
                "nothing proves which code holds the keys.",
                evidence.runtime.value,
            )
            return
        self._check_quote(evidence.quote, evidence.report_data)

    def _check_quote(self, quote: bytes, expected_report_data: bytes) -> None:
        q = QuoteFields.parse(quote)
        if q.report_data != expected_report_data:
            raise AttestationError("report_data: the quote does not carry the evidence's report data.")
        if q.debug and not self.allow_debug:
            raise AttestationError("debug: the enclave is a debug enclave, whose memory the host can read.")
        if self.mrenclave is not None and q.mrenclave != self.mrenclave:
            raise AttestationError(f"mrenclave: got {q.mrenclave.hex()}, policy expects {self.mrenclave.hex()}.")
        if self.mrsigner is not None and q.mrsigner != self.mrsigner:
            raise AttestationError(f"mrsigner: got {q.mrsigner.hex()}, policy expects {self.mrsigner.hex()}.")
        if self.isv_prod_id is not None and q.isv_prod_id != self.isv_prod_id:
            raise AttestationError(f"isv_prod_id: got {q.isv_prod_id}, policy expects {self.isv_prod_id}.")
        if q.isv_svn < self.min_isv_svn:
            raise AttestationError(f"isv_svn: got {q.isv_svn}, policy requires at least {self.min_isv_svn}.")
        from .quote_verify import verify_quote_signature  # needs the optional 'dcap' extra

        status = verify_quote_signature(quote, self.pccs_url)
        if status not in self.allowed_tcb:
            raise AttestationError(
                f"tcb_status: the platform's TCB status is {status!r}; the policy accepts {list(self.allowed_tcb)}."
            )
