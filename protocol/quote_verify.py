"""An SGX DCAP quote's signature chain and TCB status, checked by the optional ``dcap-qvl`` library.

:class:`protocol.evidence.QuoteFields` reads what a quote *claims* (MRENCLAVE,
MRSIGNER, ISV ids, debug bit, report data); nothing in those bytes proves that
an SGX CPU produced them. That proof is the quote's signature: the attestation
key signed the report, Intel's Quoting Enclave vouched for the attestation key,
and the Quoting Enclave's PCK certificate chains up to Intel's SGX root CA.
Whether the platform is patched is Intel's *TCB status* for it. Checking both
needs collateral (TCB info, QE identity, revocation lists) from a PCCS or from
Intel's PCS, and a verifier: ``dcap-qvl`` (``pip install 'heclave[dcap]'``).

The import is lazy, so everything else in heclave works without the extra; a
policy that reaches this check without it is refused with instructions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from .errors import AttestationError

log = logging.getLogger(__name__)

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
"""Used when the policy names no PCCS: Intel's own Provisioning Certification Service."""

COLLATERAL_TIMEOUT_S = 30.0

# dcap-qvl 0.7.0 fetches collateral on a tokio runtime whose worker threads take
# the GIL once more after the awaited result is delivered. If the interpreter
# starts finalizing at that moment, the worker is killed inside Rust code and
# the process segfaults at exit (reproduced here: about half the runs of a
# script that exits right after one fetch). Releasing the GIL briefly after the
# fetch lets the worker finish; 5 ms sufficed in 120 of 120 runs.
_SETTLE_S = 0.05


def verify_quote_signature(
    quote: bytes, pccs_url: str | None, now: int | None = None, timeout_s: float = COLLATERAL_TIMEOUT_S
) -> str:
    """Verify ``quote``'s signature chain against collateral from ``pccs_url``; return its TCB status.

    The status is Intel's word for the platform, e.g. ``"UpToDate"``,
    ``"SWHardeningNeeded"``, ``"ConfigurationNeeded"`` or ``"OutOfDate"``; the
    caller's policy decides which to accept (a revoked platform is refused
    here). ``pccs_url`` is a PCCS base URL such as ``https://pccs.example:8081``
    (a trailing ``/sgx/certification/v4`` is accepted too); ``None`` means
    Intel's PCS. ``now`` (Unix seconds) is the time certificates and collateral
    must be valid at; the default is the current time.

    Raises :class:`AttestationError` when the ``dcap`` extra is missing, the
    quote is not an SGX DCAP quote, collateral cannot be fetched, or the
    signature chain does not verify.
    """
    try:
        import dcap_qvl
    except ImportError:
        raise AttestationError(
            "quote signature: verifying an SGX quote's signature and TCB status needs the optional dcap-qvl "
            "library; install the dcap extra: pip install 'heclave[dcap]'. Refusing, because the quote's "
            "fields alone do not prove it came from an SGX CPU."
        ) from None

    # Parse before any network traffic: a malformed quote is refused offline.
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
    except ValueError as exc:
        raise AttestationError(f"quote signature: the quote is not a well-formed DCAP quote ({exc}).") from None
    if not parsed.is_sgx():
        raise AttestationError(f"quote signature: expected an SGX quote, got a {parsed.quote_type()} quote.")

    url = (pccs_url or "").strip() or INTEL_PCS_URL
    collateral = _fetch_collateral(dcap_qvl, url, bytes(quote), timeout_s)
    try:
        report = dcap_qvl.verify(bytes(quote), collateral, int(time.time()) if now is None else int(now))
    except ValueError as exc:
        raise AttestationError(
            f"quote signature: the quote's signature chain or the collateral from {url} did not verify "
            f"({_first_line(exc)}). Do not send anything to this enclave."
        ) from None
    if report.advisory_ids:
        log.warning(
            "the enclave's platform (TCB status %s) is affected by %s", report.status, ", ".join(report.advisory_ids)
        )
    return report.status


def _fetch_collateral(dcap_qvl, url: str, quote: bytes, timeout_s: float):
    """The TCB info, QE identity and CRLs for ``quote``, from the PCCS at ``url``."""

    async def fetch():
        # get_collateral must be called with an event loop running.
        return await asyncio.wait_for(dcap_qvl.get_collateral(url, quote), timeout_s)

    try:
        in_async_code = asyncio.get_running_loop() is not None
    except RuntimeError:
        in_async_code = False
    try:
        if in_async_code:  # our caller's loop is busy running us: fetch on a thread of its own
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, fetch()).result()
        return asyncio.run(fetch())
    except TimeoutError:
        raise AttestationError(
            f"quote signature: no collateral from {url} within {timeout_s:g} s. Check that the PCCS is "
            "running and reachable, or name another with pccs_url in the policy (--pccs-url)."
        ) from None
    except (ValueError, RuntimeError, OSError) as exc:
        raise AttestationError(
            f"quote signature: could not fetch collateral for this quote from {url} ({_first_line(exc)}). "
            "Check the PCCS URL in the policy (pccs_url / --pccs-url) and that the PCCS can reach Intel's PCS."
        ) from None
    finally:
        time.sleep(_SETTLE_S)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
