"""MRENCLAVE and the ISV ids read from a SIGSTRUCT, built here from the SDM's layout (no Gramine needed)."""

from __future__ import annotations

import hashlib
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from heclave.protocol.errors import AttestationError
from heclave.protocol.evidence import Evidence, Runtime, VerifierPolicy, report_data
from heclave.tee.measure import SIG_FILE, Sigstruct, measure, pinning_policy, read_sigstruct
from tests.protocol.test_evidence import CONTEXT, IDENTITY, build_quote

HEADER = bytes.fromhex("06000000e10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")


def sigstruct(mrenclave: bytes, isv_prod_id: int, isv_svn: int, modulus: bytes, debug: bool = False) -> bytes:
    """A SIGSTRUCT laid out field by field as in Intel SDM vol. 3D, table "Layout of Enclave Signature Structure"."""
    fields = [
        (0, HEADER),
        (16, struct.pack("<I", 0)),  # VENDOR
        (20, struct.pack("<HBB", 0x2026, 0x11, 0x21)),  # DATE (BCD)
        (24, HEADER2),
        (40, struct.pack("<I", 0)),  # SWDEFINED
        (44, bytes(84)),  # RESERVED
        (128, modulus),  # MODULUS (384)
        (512, struct.pack("<I", 3)),  # EXPONENT
        (516, b"\x5a" * 384),  # SIGNATURE
        (900, struct.pack("<I", 0)),  # MISCSELECT
        (904, struct.pack("<I", 0xFFFFFFFF)),  # MISCMASK
        (908, bytes(4)),  # RESERVED
        (912, bytes(16)),  # ISVFAMILYID
        (928, struct.pack("<QQ", 0x04 | (0x02 if debug else 0), 0x03)),  # ATTRIBUTES (flags: MODE64BIT[, DEBUG])
        (944, struct.pack("<QQ", 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)),  # ATTRIBUTEMASK
        (960, mrenclave),  # ENCLAVEHASH
        (992, bytes(16)),  # RESERVED
        (1008, bytes(16)),  # ISVEXTPRODID
        (1024, struct.pack("<H", isv_prod_id)),  # ISVPRODID
        (1026, struct.pack("<H", isv_svn)),  # ISVSVN
        (1028, bytes(12)),  # RESERVED
        (1040, b"\x01" * 384),  # Q1
        (1424, b"\x02" * 384),  # Q2
    ]
    out = b""
    for offset, value in fields:
        assert len(out) == offset, f"field at {offset} follows {len(out)} bytes"
        out += value
    assert len(out) == 1808
    return out


MRENCLAVE = hashlib.sha256(b"heclave enclave").digest()
MODULUS = hashlib.sha512(b"signer").digest() * 6


def test_measure_returns_mrenclave_hex(tmp_path):
    (tmp_path / SIG_FILE).write_bytes(sigstruct(MRENCLAVE, 1, 7, MODULUS))
    assert measure(tmp_path) == MRENCLAVE.hex()


def test_sigstruct_fields(tmp_path):
    (tmp_path / SIG_FILE).write_bytes(sigstruct(MRENCLAVE, 0x1234, 0xBEEF, MODULUS))
    sig = read_sigstruct(tmp_path)
    assert sig == Sigstruct(
        mrenclave=MRENCLAVE,
        mrsigner=hashlib.sha256(MODULUS).digest(),
        isv_prod_id=0x1234,
        isv_svn=0xBEEF,
        debug=False,
    )


def test_debug_attribute_is_reported(tmp_path):
    (tmp_path / SIG_FILE).write_bytes(sigstruct(MRENCLAVE, 1, 1, MODULUS, debug=True))
    assert read_sigstruct(tmp_path).debug is True


def test_unbuilt_enclave_names_the_file_and_the_command(tmp_path):
    with pytest.raises(AttestationError) as err:
        measure(tmp_path)
    assert str(tmp_path / SIG_FILE) in err.value.message
    assert "make -C" in err.value.message and "SGX=1" in err.value.message


@pytest.mark.parametrize(
    "mangle",
    [lambda b: b[:-1], lambda b: b + b"\0", lambda b: b"\0" + b[1:], lambda b: b[:24] + bytes(16) + b[40:]],
    ids=["short", "long", "bad-header", "bad-header2"],
)
def test_not_a_sigstruct_is_refused(tmp_path, mangle):
    (tmp_path / SIG_FILE).write_bytes(mangle(sigstruct(MRENCLAVE, 1, 1, MODULUS)))
    with pytest.raises(AttestationError, match="not an SGX SIGSTRUCT"):
        measure(tmp_path)


HECLAVE = str(Path(sys.executable).parent / "heclave")


def _measure_to(gramine_dir: Path, policy: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [HECLAVE, "enclave", "--gramine-dir", str(gramine_dir), *extra, "--policy-out", str(policy)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_measure_writes_a_policy_that_pins_the_signed_enclave(tmp_path):
    (tmp_path / SIG_FILE).write_bytes(sigstruct(MRENCLAVE, 5, 9, MODULUS))
    policy_file = tmp_path / "policy.toml"
    done = _measure_to(tmp_path, policy_file, "--measure")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(policy_file.stat().st_mode) == 0o644  # owners and their tools read it
    policy = VerifierPolicy.from_toml(policy_file)
    assert policy == pinning_policy(read_sigstruct(tmp_path))
    assert (policy.mrenclave, policy.mrsigner) == (MRENCLAVE, hashlib.sha256(MODULUS).digest())
    assert (policy.isv_prod_id, policy.min_isv_svn, policy.allow_debug, policy.allow_unattested) == (5, 9, False, False)
    assert policy.pinned and not list(tmp_path.glob(".*.tmp"))


def _evidence(**quote_fields) -> Evidence:
    return Evidence(Runtime.GRAMINE_SGX, IDENTITY, report_data(IDENTITY, CONTEXT), build_quote(**quote_fields))


def test_the_written_policy_accepts_only_the_measured_enclave_up_to_the_signature_check(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dcap_qvl", None)
    (tmp_path / SIG_FILE).write_bytes(sigstruct(MRENCLAVE, 5, 9, MODULUS))
    assert _measure_to(tmp_path, tmp_path / "policy.toml", "--measure").returncode == 0
    policy = VerifierPolicy.from_toml(tmp_path / "policy.toml")
    signer = hashlib.sha256(MODULUS).digest()
    with pytest.raises(AttestationError, match="dcap"):  # every field matched; only the signature is left
        policy.verify(_evidence(mrenclave=MRENCLAVE, mrsigner=signer, prod_id=5, svn=9), CONTEXT)
    for tampered, field in [
        ({"mrenclave": bytes(32), "mrsigner": signer, "prod_id": 5, "svn": 9}, "mrenclave"),
        ({"mrenclave": MRENCLAVE, "mrsigner": bytes(32), "prod_id": 5, "svn": 9}, "mrsigner"),
        ({"mrenclave": MRENCLAVE, "mrsigner": signer, "prod_id": 5, "svn": 8}, "isv_svn"),
        ({"mrenclave": MRENCLAVE, "mrsigner": signer, "prod_id": 5, "svn": 9, "debug": True}, "debug"),
    ]:
        with pytest.raises(AttestationError, match=field):
            policy.verify(_evidence(**tampered), CONTEXT)


def test_a_debug_enclave_gets_a_policy_that_refuses_it_and_a_warning(tmp_path):
    (tmp_path / SIG_FILE).write_bytes(sigstruct(MRENCLAVE, 1, 1, MODULUS, debug=True))
    done = _measure_to(tmp_path, tmp_path / "policy.toml", "--measure")
    assert done.returncode == 0 and "debug enclave" in done.stderr
    assert VerifierPolicy.from_toml(tmp_path / "policy.toml").allow_debug is False


def test_policy_out_needs_measure_and_a_signed_enclave(tmp_path):
    done = _measure_to(tmp_path, tmp_path / "policy.toml")
    assert done.returncode == 2 and "--measure" in done.stderr
    done = _measure_to(tmp_path, tmp_path / "policy.toml", "--measure")
    assert done.returncode == 1 and "SGX=1" in done.stderr and not (tmp_path / "policy.toml").exists()


def test_require_attestation_pins_the_signed_enclave_or_says_what_to_pin(tmp_path, monkeypatch):
    from heclave.parties.demo import pinned_policy
    from heclave.tee import measure

    monkeypatch.setattr(measure, "GRAMINE_DIR", tmp_path)
    with pytest.raises(AttestationError) as refused:
        pinned_policy()
    assert "mrenclave" in refused.value.message and "--policy-out" in refused.value.message
    assert "SGX=1" in refused.value.message  # how to build the enclave that gives the values
    (tmp_path / SIG_FILE).write_bytes(sigstruct(MRENCLAVE, 2, 3, MODULUS))
    policy = pinned_policy()
    assert policy.pinned and policy.mrenclave == MRENCLAVE and not policy.allow_unattested
