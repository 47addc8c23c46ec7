"""Evidence and verifier policy against quotes built from the documented SGX DCAP layout.

The quote's *signature* is not exercised here (that needs Intel's collateral
and real hardware); these tests cover every field check and the binding of the
report data to the enclave's keys.
"""

from __future__ import annotations

import struct

import pytest

from heclave.protocol.errors import AttestationError
from heclave.protocol.evidence import Evidence, QuoteFields, Runtime, VerifierPolicy, report_data

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
        VerifierPolicy(mrenclave=MRENCLAVE, allow_debug=True).verify(sgx_evidence(debug=True), CONTEXT)


def test_unattested_runtimes_are_refused_by_default():
    for runtime in (Runtime.NATIVE, Runtime.GRAMINE_DIRECT):
        evidence = Evidence(runtime, IDENTITY, report_data(IDENTITY, CONTEXT))
        with pytest.raises(AttestationError, match="runtime"):
            VerifierPolicy().verify(evidence, CONTEXT)
        VerifierPolicy.development().verify(evidence, CONTEXT)


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


@pytest.fixture
def signature_checks(monkeypatch) -> list[bytes]:
    """The quotes that reached the signature check; reaching it ends verification there (no dcap extra)."""
    from heclave.protocol import quote_verify

    reached: list[bytes] = []

    def check(quote: bytes, pccs_url: str | None) -> str:
        reached.append(quote)
        raise AttestationError("signature check reached (dcap not exercised)")

    monkeypatch.setattr(quote_verify, "verify_quote_signature", check)
    return reached


@pytest.mark.parametrize(
    "policy",
    [
        VerifierPolicy(),
        VerifierPolicy(allow_debug=True, min_isv_svn=3),
        VerifierPolicy(mrsigner=MRSIGNER),
        VerifierPolicy(isv_prod_id=7, min_isv_svn=3),
    ],
    ids=["default", "unpinned-with-other-checks", "mrsigner-without-isv-prod-id", "isv-prod-id-alone"],
)
def test_unpinned_policies_refuse_sgx_evidence_before_the_signature_check(policy, signature_checks):
    assert not policy.pinned
    with pytest.raises(AttestationError) as refused:
        policy.verify(sgx_evidence(), CONTEXT)
    message = refused.value.message
    assert message.startswith("pinning:") and signature_checks == []
    # The refusal says what to pin and how to get the values.
    assert "mrenclave" in message and "mrsigner together with isv_prod_id" in message
    assert "heclave enclave --measure --policy-out policy.toml" in message
    if policy.mrsigner is not None:
        assert "mrsigner without isv_prod_id" in message


@pytest.mark.parametrize(
    "policy",
    [VerifierPolicy(mrenclave=MRENCLAVE), VerifierPolicy(mrsigner=MRSIGNER, isv_prod_id=7), STRICT],
    ids=["mrenclave", "mrsigner-and-isv-prod-id", "everything"],
)
def test_pinned_policies_check_the_quote_up_to_its_signature(policy, signature_checks):
    assert policy.pinned
    with pytest.raises(AttestationError, match="signature check reached"):
        policy.verify(sgx_evidence(), CONTEXT)
    assert signature_checks == [sgx_evidence().quote]


def test_unattested_development_runs_need_no_pinning():
    evidence = Evidence(Runtime.NATIVE, IDENTITY, report_data(IDENTITY, CONTEXT))
    VerifierPolicy.development().verify(evidence, CONTEXT)


@pytest.mark.parametrize(
    "line, field",
    [
        ('allow_debug = "false"', "allow_debug"),
        ('allow_unattested = "no"', "allow_unattested"),
        ("allow_debug = 0", "allow_debug"),
        ('isv_prod_id = "7"', "isv_prod_id"),
        ("isv_prod_id = true", "isv_prod_id"),
        ("isv_prod_id = 65536", "isv_prod_id"),
        ("min_isv_svn = 2.0", "min_isv_svn"),
        ("min_isv_svn = -1", "min_isv_svn"),
        ("pccs_url = 8081", "pccs_url"),
        ('allowed_tcb = "UpToDate"', "allowed_tcb"),
        ('allowed_tcb = ["UpToDate", 1]', "allowed_tcb"),
        ("mrenclave = 1", "mrenclave"),
        (f'mrsigner = "{MRSIGNER.hex()[:-2]}"', "mrsigner"),
        (f'mrenclave = "{"g" * 64}"', "mrenclave"),
        (f'mrenclave = "{" " * 8 + MRENCLAVE.hex()[8:]}"', "mrenclave"),
    ],
)
def test_a_policy_file_field_of_the_wrong_type_is_refused_naming_it(tmp_path, line, field):
    path = tmp_path / "policy.toml"
    path.write_text(f'mrenclave = "{MRENCLAVE.hex()}"\n' * (not line.startswith("mrenclave")) + line + "\n")
    with pytest.raises(AttestationError, match=field) as refused:
        VerifierPolicy.from_toml(path)
    assert refused.value.code.value == "attestation"


def test_a_string_false_never_switches_the_debug_check_off(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'mrenclave = "{MRENCLAVE.hex()}"\nallow_debug = "false"\n')
    with pytest.raises(AttestationError, match="'allow_debug' must be true or false"):
        VerifierPolicy.from_toml(path)
    path.write_text(f'mrenclave = "{MRENCLAVE.hex()}"\nallow_debug = false\n')
    with pytest.raises(AttestationError, match="debug"):
        VerifierPolicy.from_toml(path).verify(sgx_evidence(debug=True), CONTEXT)


def test_wrong_types_are_refused_from_code_too():
    with pytest.raises(AttestationError, match="allow_debug"):
        VerifierPolicy(mrenclave=MRENCLAVE, allow_debug="false")
    with pytest.raises(AttestationError, match="mrenclave"):
        VerifierPolicy(mrenclave=MRENCLAVE.hex())


@pytest.mark.parametrize(
    "policy",
    [
        STRICT,
        VerifierPolicy(),
        VerifierPolicy(
            mrsigner=MRSIGNER, isv_prod_id=0, allow_debug=True, allowed_tcb=("UpToDate", "SWHardeningNeeded")
        ),
        VerifierPolicy(allow_unattested=True, pccs_url='https://pccs.example:8081/"quoted"\\ é\x7f', allowed_tcb=()),
    ],
)
def test_a_policy_written_as_toml_reads_back_equal(tmp_path, policy):
    path = tmp_path / "policy.toml"
    path.write_text(policy.to_toml())
    assert VerifierPolicy.from_toml(path) == policy
