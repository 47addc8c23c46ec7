"""What can be checked of quote-signature verification without Intel's collateral.

None of these tests verifies a genuine signature chain: that needs a quote from
a real SGX machine and collateral from a PCCS. They check that a missing
``dcap`` extra, a malformed quote and an unreachable PCCS are each refused with
an AttestationError that says what to do, and that the network is never needed
to refuse a malformed quote.
"""

from __future__ import annotations

import struct
import sys
import time

import pytest

from heclave.protocol.errors import AttestationError
from heclave.protocol.quote_verify import verify_quote_signature

UNREACHABLE_PCCS = "http://127.0.0.1:9/"  # the discard port: connection refused at once


def sgx_quote_without_pck_chain() -> bytes:
    """A structurally valid SGX DCAP v3 quote with zero signatures and certification data type 3.

    Type 3 (encrypted PPID) carries no PCK certificate, so fetching collateral
    must ask the PCCS for one; nothing in it is signed.
    """
    intel_qe_vendor = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
    header = struct.pack("<HHIHH", 3, 2, 0, 0, 0) + intel_qe_vendor + bytes(20)
    report_body = bytes(384)
    cert_data = bytes(384) + bytes(16) + struct.pack("<HH", 0, 0)  # enc PPID, CPUSVN, PCESVN, PCEID
    signature = (
        bytes(64)
        + bytes(64)
        + bytes(384)
        + bytes(64)  # ECDSA sig, attestation key, QE report, its sig
        + struct.pack("<H", 0)  # QE auth data (empty)
        + struct.pack("<HI", 3, len(cert_data))
        + cert_data
    )
    return header + report_body + struct.pack("<I", len(signature)) + signature


def test_missing_dcap_extra_names_the_install_command_signature_not_exercised(monkeypatch):
    monkeypatch.setitem(sys.modules, "dcap_qvl", None)  # makes `import dcap_qvl` fail
    with pytest.raises(AttestationError) as err:
        verify_quote_signature(sgx_quote_without_pck_chain(), UNREACHABLE_PCCS)
    assert "pip install 'heclave[dcap]'" in err.value.message


@pytest.mark.parametrize("quote", [b"", b"\x03\x00" * 10, b"garbage" * 100], ids=["empty", "short", "garbage"])
def test_malformed_quote_refused_offline_signature_not_exercised(quote, monkeypatch):
    import dcap_qvl  # installed by `make test` (the dcap extra)

    def no_network(*args, **kwargs):
        raise AssertionError("a malformed quote must be refused before any collateral is fetched")

    monkeypatch.setattr(dcap_qvl, "get_collateral", no_network)
    with pytest.raises(AttestationError, match="not a well-formed DCAP quote"):
        verify_quote_signature(quote, UNREACHABLE_PCCS)


def test_unreachable_pccs_refused_quickly_signature_not_exercised():
    started = time.monotonic()
    with pytest.raises(AttestationError) as err:
        verify_quote_signature(sgx_quote_without_pck_chain(), UNREACHABLE_PCCS, timeout_s=10)
    assert time.monotonic() - started < 10
    assert UNREACHABLE_PCCS in err.value.message and "pccs_url" in err.value.message
