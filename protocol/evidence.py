"""Attestation evidence: what the enclave presents, and the owners' policy for accepting it.

The enclave binds its X25519 identity key and its public CKKS context into the
64-byte report data: ``sha256(identity_public || sha256(public_parameters))``
followed by 32 zero bytes. An owner that accepts the evidence therefore knows
which keys it is about to trust. Three runtimes exist: ``gramine-sgx`` (a DCAP
quote), ``gramine-direct`` and ``native`` (no quote: nothing is attested).

A genuine SGX quote only proves that *some* enclave runs on a genuine CPU: the
operator can build and sign an enclave of its own that exports its keys. So a
policy accepts SGX evidence only when it pins the enclave, by MRENCLAVE or by
MRSIGNER together with ISV_PROD_ID (:data:`PINNING`), and every field of a
policy is checked for its type, so ``allow_debug = "false"`` is an error, not
``bool("false")``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import tomllib
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

from .errors import AttestationError

log = logging.getLogger(__name__)

PINNING = (
    "Pin the enclave: mrenclave (exactly one build), or mrsigner together with isv_prod_id (any build its "
    "signer releases as that product; add min_isv_svn). `heclave enclave --measure --policy-out policy.toml`, "
    "run where the enclave was built and signed, writes a policy file with these values from its SIGSTRUCT; "
    "owners pass it with --policy policy.toml."
)


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

    def __post_init__(self) -> None:
        """Refuse any field of the wrong type, naming it: a policy that means something else must not load."""
        for name in ("mrenclave", "mrsigner"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, bytes) and len(value) == 32):
                _wrong(name, "32 bytes, written as 64 hexadecimal characters", value)
        for name in ("isv_prod_id", "min_isv_svn"):
            value = getattr(self, name)
            if value is None and name == "isv_prod_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 16:
                _wrong(name, "an integer from 0 to 65535", value)
        for name in ("allow_debug", "allow_unattested"):
            if not isinstance(getattr(self, name), bool):
                _wrong(name, "true or false (a boolean, unquoted)", getattr(self, name))
        if self.pccs_url is not None and not isinstance(self.pccs_url, str):
            _wrong("pccs_url", "a string", self.pccs_url)
        if not isinstance(self.allowed_tcb, tuple) or not all(isinstance(s, str) for s in self.allowed_tcb):
            _wrong("allowed_tcb", 'a list of TCB status strings such as ["UpToDate"]', self.allowed_tcb)

    @classmethod
    def development(cls) -> VerifierPolicy:
        """The policy of a development run on a machine without SGX: it accepts an enclave that presents
        no quote (and logs at every connection that nothing proves which code holds the keys)."""
        return cls(allow_unattested=True)

    @property
    def pinned(self) -> bool:
        """Whether this policy names the enclave it trusts: MRENCLAVE, or MRSIGNER with ISV_PROD_ID."""
        return self.mrenclave is not None or (self.mrsigner is not None and self.isv_prod_id is not None)

    def require_pinned(self) -> None:
        """Raise :class:`AttestationError` saying what to pin unless :attr:`pinned`."""
        if self.pinned:
            return
        if self.mrsigner is not None:
            problem = "mrsigner without isv_prod_id accepts every enclave its signer signed, for any product."
        else:
            problem = (
                "the policy pins no enclave, so it would accept any SGX enclave on a genuine CPU, including one "
                "the operator built to export its keys."
            )
        raise AttestationError(f"pinning: {problem} {PINNING}")

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> VerifierPolicy:
        """Read a policy file; keyword ``overrides`` (from CLI flags, ``None`` = unset) win."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AttestationError(f"Cannot read the verifier policy {path}: {exc}.") from None
        data |= {k: v for k, v in overrides.items() if v is not None}
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "the verifier policy") -> VerifierPolicy:
        """A policy from plain values (a TOML file's or flags'): measurements as 64 hexadecimal characters,
        lists for ``allowed_tcb``, each field of its own type; anything else is refused naming the field."""
        valid = [f.name for f in fields(cls)]
        unknown = set(data) - set(valid)
        if unknown:
            raise AttestationError(f"Unknown keys {sorted(unknown)} in {source}; valid keys: {', '.join(valid)}.")
        values = {k: v for k, v in data.items() if v is not None}
        for name in ("mrenclave", "mrsigner"):
            if name in values:
                values[name] = _measurement(name, values[name])
        if isinstance(values.get("allowed_tcb"), list):
            values["allowed_tcb"] = tuple(values["allowed_tcb"])
        return cls(**values)

    def to_toml(self) -> str:
        """This policy as a file :meth:`from_toml` reads back to an equal policy (unset fields left out)."""
        return "".join(
            f"{f.name} = {_toml(getattr(self, f.name))}\n" for f in fields(self) if getattr(self, f.name) is not None
        )

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
        self.require_pinned()  # before anything else in the quote: an unpinned policy trusts no SGX evidence
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


def _wrong(name: str, expected: str, value: Any) -> NoReturn:
    raise AttestationError(
        f"Policy field {name!r} must be {expected}, not {type(value).__name__} {value!r:.80}; fix it in the policy."
    )


def _measurement(name: str, value: Any) -> Any:
    """A measurement given as 64 hexadecimal characters, as bytes; other types are left for the type check."""
    if not isinstance(value, str):
        return value
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise AttestationError(f"{name} must be 64 hexadecimal characters (32 bytes), got {value!r:.80}.")
    return bytes.fromhex(value)


def _toml(value: Any) -> str:
    """A TOML value for a policy field (strings as JSON writes them, which TOML reads, DEL escaped too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return f'"{value.hex()}"'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml(v) for v in value) + "]"
