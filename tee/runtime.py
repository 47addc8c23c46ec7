"""Which runtime the enclave program is in, detected from what Gramine exposes, never guessed.

Under ``gramine-sgx`` the pseudo-files ``/dev/attestation/user_report_data`` and
``/dev/attestation/quote`` exist; under ``gramine-direct`` only
``/dev/attestation/keys`` does; natively there is no ``/dev/attestation``.
Everything that differs between the runtimes is in this module.
"""

from __future__ import annotations

from pathlib import Path

from heclave.protocol.errors import AttestationError
from heclave.protocol.evidence import Evidence, Runtime, report_data

ATTESTATION_DIR = Path("/dev/attestation")


def detect(root: Path = ATTESTATION_DIR) -> Runtime:
    """The runtime this process runs under."""
    if (root / "quote").exists() and (root / "user_report_data").exists():
        return Runtime.GRAMINE_SGX
    if root.exists():
        return Runtime.GRAMINE_DIRECT
    return Runtime.NATIVE


def collect_evidence(
    identity_public: bytes, public_parameters: bytes, runtime: Runtime, root: Path = ATTESTATION_DIR
) -> Evidence:
    """Evidence binding the identity key and public parameters; a DCAP quote under gramine-sgx."""
    data = report_data(identity_public, public_parameters)
    if runtime is not Runtime.GRAMINE_SGX:
        return Evidence(runtime, identity_public, data)
    try:
        (root / "user_report_data").write_bytes(data)
        quote = (root / "quote").read_bytes()
    except OSError as exc:
        raise AttestationError(f"Could not obtain an SGX quote from Gramine ({exc.strerror}).") from None
    return Evidence(runtime, identity_public, data, quote)
