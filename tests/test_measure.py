"""MRENCLAVE and the ISV ids read from a SIGSTRUCT, built here from the SDM's layout (no Gramine needed)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from protocol.errors import AttestationError
from tee.measure import SIG_FILE, Sigstruct, measure, read_sigstruct

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
