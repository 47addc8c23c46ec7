"""Evidence and verifier policy against quotes built from the documented SGX DCAP layout.

The quote's *signature* is not exercised here (that needs Intel's collateral
and real hardware); these tests cover every field check and the binding of the
report data to the enclave's keys.
"""

from __future__ import annotations

import struct

import pytest

from protocol.errors import AttestationError
from protocol.evidence import Evidence, QuoteFields, Runtime, VerifierPolicy, report_data

IDENTITY = bytes(range(32))
CONTEXT = b"the public CKKS context"
MRENCLAVE = bytes([0xAA]) * 32
MRSIGNER = bytes([0xBB]) * 32


def build_quote(debug=False, mrenclave=MRENCLAVE, mrsigner=MRSIGNER, prod_id=7, svn=3, data=None) -> bytes:
    """A quote-shaped byte string: header (48 bytes) and report body at the documented offsets."""
    quote = bytearray(1024)
    struct.pack_into("<HH", quote, 0, 3, 2)  # version 3, ECDSA-256
    struct.pack_into("<Q", quote, 96, 0x02 if debug else 0x00)
    quote[112:144] = mrenclave
    quote[176:208] = mrsigner
    struct.pack_into("<HH", quote, 304, prod_id, svn)
    quote[368:432] = report_data(IDENTITY, CONTEXT) if data is None else data
    return bytes(quote)


def sgx_evidence(**quote_fields) -> Evidence:
    return Evidence(Runtime.GRAMINE_SGX, IDENTITY, report_data(IDENTITY, CONTEXT), build_quote(**quote_fields))


STRICT = VerifierPolicy(mrenclave=MRENCLAVE, mrsigner=MRSIGNER, isv_prod_id=7, min_isv_svn=3)


def test_quote_fields_are_read_at_their_documented_offsets():
    q = QuoteFields.parse(build_quote(debug=True, prod_id=9, svn=4))
    assert (q.debug, q.mrenclave, q.mrsigner, q.isv_prod_id, q.isv_svn) == (True, MRENCLAVE, MRSIGNER, 9, 4)
    assert q.report_data == report_data(IDENTITY, CONTEXT)


@pytest.mark.parametrize(
    "tampered, field",
    [
        ({"mrenclave": b"\x01" * 32}, "mrenclave"),
        ({"mrsigner": b"\x02" * 32}, "mrsigner"),
        ({"prod_id": 8}, "isv_prod_id"),
        ({"svn": 2}, "isv_svn"),
        ({"debug": True}, "debug"),
        ({"data": b"\x00" * 64}, "report_data"),
    ],
)
def test_each_tampered_field_is_refused_and_named_signature_not_exercised(tampered, field):
    with pytest.raises(AttestationError, match=field):
        STRICT.verify(sgx_evidence(**tampered), CONTEXT)


def test_evidence_for_other_keys_is_refused():
    evidence = sgx_evidence()
    with pytest.raises(AttestationError, match="report_data"):
        STRICT.verify(evidence, b"a context the enclave did not bind")
    swapped = Evidence(Runtime.GRAMINE_SGX, bytes(32), evidence.report_data, evidence.quote)
    with pytest.raises(AttestationError, match="report_data"):
        STRICT.verify(swapped, CONTEXT)


def test_good_fields_still_need_the_signature_check_signature_not_exercised(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dcap_qvl", None)
    with pytest.raises(AttestationError, match="dcap"):
        STRICT.verify(sgx_evidence(), CONTEXT)


def test_debug_enclave_accepted_only_when_the_policy_allows_signature_not_exercised(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dcap_qvl", None)
    # Past the debug check, verification stops only at the signature step, which needs the dcap extra.
    with pytest.raises(AttestationError, match="dcap"):
        VerifierPolicy(allow_debug=True).verify(sgx_evidence(debug=True), CONTEXT)


def test_unattested_runtimes_are_refused_by_default():
    for runtime in (Runtime.NATIVE, Runtime.GRAMINE_DIRECT):
        evidence = Evidence(runtime, IDENTITY, report_data(IDENTITY, CONTEXT))
        with pytest.raises(AttestationError, match="runtime"):
            VerifierPolicy().verify(evidence, CONTEXT)
        VerifierPolicy(allow_unattested=True).verify(evidence, CONTEXT)


def test_policy_file_and_flags(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'mrenclave = "{MRENCLAVE.hex()}"\nisv_prod_id = 7\nmin_isv_svn = 2\nallow_debug = false\n')
    policy = VerifierPolicy.from_toml(path, min_isv_svn=5, allow_unattested=None)
    assert (policy.mrenclave, policy.isv_prod_id, policy.min_isv_svn) == (MRENCLAVE, 7, 5)
    assert not policy.allow_unattested and not policy.allow_debug
    path.write_text('mrenclave = "abcd"\n')
    with pytest.raises(AttestationError, match="64 hexadecimal"):
        VerifierPolicy.from_toml(path)
    path.write_text("mr_enclave = 1\n")
    with pytest.raises(AttestationError, match="Unknown keys"):
        VerifierPolicy.from_toml(path)
