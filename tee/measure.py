"""The measurement owners pin, read from the signed enclave's SIGSTRUCT without needing Gramine.

``gramine-sgx-sign`` writes the enclave's SIGSTRUCT (Intel SDM vol. 3D,
"Enclave Signature Structure", 1808 bytes) to ``heclave-enclave.sig`` beside
the manifest. Its ENCLAVEHASH is the MRENCLAVE the CPU computes when it loads
the enclave (EINIT refuses the enclave otherwise), so it is the value to put in
the owners' policy. MRSIGNER is SHA-256 of the signer's RSA modulus as stored.
:func:`pinning_policy` turns the fields into the policy owners load
(``heclave enclave --measure --policy-out policy.toml`` writes it).
Offsets are architectural: HEADER 0, HEADER2 24, MODULUS 128, EXPONENT 512, SIGNATURE 516,
MISCSELECT 900, MISCMASK 904, 4 reserved bytes, ISVFAMILYID 912, ATTRIBUTES
928, ATTRIBUTEMASK 944, ENCLAVEHASH 960, 16 reserved bytes, ISVEXTPRODID 992,
ISVPRODID 1024, ISVSVN 1026, 12 reserved bytes, Q1 1040, Q2 1424.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from heclave.protocol.errors import AttestationError
from heclave.protocol.evidence import VerifierPolicy

GRAMINE_DIR = Path(__file__).resolve().parent / "gramine"
SIG_FILE = "heclave-enclave.sig"
SIGSTRUCT_SIZE = 1808
SIGSTRUCT_HEADER = bytes.fromhex("06000000e10000000000010000000000")
SIGSTRUCT_HEADER2 = bytes.fromhex("01010000600000006000000001000000")  # at offset 24
DEBUG_FLAG = 0x02  # ATTRIBUTES.FLAGS bit 1

_MODULUS, _ATTRIBUTES, _ENCLAVE_HASH, _ISV_PROD_ID, _ISV_SVN = 128, 928, 960, 1024, 1026


@dataclass(frozen=True)
class Sigstruct:
    """The identity fields of a signed enclave, as its SGX quote will report them."""

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool

    @classmethod
    def parse(cls, data: bytes, source: str = "SIGSTRUCT") -> Sigstruct:
        if len(data) != SIGSTRUCT_SIZE or data[:16] != SIGSTRUCT_HEADER or data[24:40] != SIGSTRUCT_HEADER2:
            raise AttestationError(
                f"{source} is not an SGX SIGSTRUCT ({len(data)} bytes; a SIGSTRUCT is {SIGSTRUCT_SIZE} bytes "
                "with the architectural HEADER and HEADER2). Rebuild it with `make -C tee/gramine SGX=1`."
            )
        flags = int.from_bytes(data[_ATTRIBUTES : _ATTRIBUTES + 8], "little")
        prod_id, svn = struct.unpack_from("<HH", data, _ISV_PROD_ID)
        return cls(
            mrenclave=data[_ENCLAVE_HASH : _ENCLAVE_HASH + 32],
            mrsigner=hashlib.sha256(data[_MODULUS : _MODULUS + 384]).digest(),
            isv_prod_id=prod_id,
            isv_svn=svn,
            debug=bool(flags & DEBUG_FLAG),
        )


def read_sigstruct(gramine_dir: Path) -> Sigstruct:
    """The SIGSTRUCT of the enclave built in ``gramine_dir`` (normally ``tee/gramine``)."""
    path = Path(gramine_dir) / SIG_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AttestationError(
            f"{path} does not exist: the enclave has not been built and signed for SGX. "
            f"Build it with `make -C {gramine_dir} SGX=1` on a machine with Gramine, then measure again."
        ) from None
    except OSError as exc:
        raise AttestationError(f"Cannot read {path}: {exc.strerror}.") from None
    return Sigstruct.parse(data, str(path))


def measure(gramine_dir: Path) -> str:
    """MRENCLAVE (64 hex digits) of the enclave built in ``gramine_dir``: the value owners pin."""
    return read_sigstruct(gramine_dir).mrenclave.hex()


def pinning_policy(sig: Sigstruct) -> VerifierPolicy:
    """The owners' policy for this signed enclave: exactly its MRENCLAVE, also its signer and product id, and
    its security version as the lowest accepted. A debug enclave's policy still refuses debug enclaves."""
    return VerifierPolicy(
        mrenclave=sig.mrenclave, mrsigner=sig.mrsigner, isv_prod_id=sig.isv_prod_id, min_isv_svn=sig.isv_svn
    )


def policy_text(sig: Sigstruct, source: Path) -> str:
    """The owners' policy file for this signed enclave (:func:`pinning_policy`), saying where it came from."""
    return (
        f"# Verifier policy for the SGX enclave signed in {source} (`heclave enclave --measure`).\n"
        "# It pins exactly this build. To accept later builds of the same signer and product instead,\n"
        "# remove mrenclave and keep mrsigner, isv_prod_id and min_isv_svn.\n"
    ) + pinning_policy(sig).to_toml()
