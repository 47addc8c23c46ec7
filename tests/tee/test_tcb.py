"""The enclave's trusted computing base stays small: heclave's tee, he, arith, graph and protocol and six
libraries, never torch.

zstandard reads the server's SEAL frames, which SEAL compresses with zstd (``he.sealformat``).
"""

from __future__ import annotations

import sys

from tests.helpers import enclave_modules

ALLOWED = {
    "cryptography",
    "msgpack",
    "numpy",
    "tenseal",
    "zmq",
    "zstandard",
    "heclave",
    "cython_runtime",
}
ENCLAVE_CODE = {"heclave", "heclave.tee", "heclave.he", "heclave.arith", "heclave.graph", "heclave.protocol"}


def test_the_enclave_program_imports_only_its_allowed_dependencies():
    modules = set(enclave_modules())
    imported = {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names)
    assert imported <= ALLOWED, f"the enclave imports {sorted(imported - ALLOWED)}"
    ours = {".".join(m.split(".")[:2]) for m in modules if m.split(".")[0] == "heclave"}
    assert ours <= ENCLAVE_CODE, f"the enclave imports {sorted(ours - ENCLAVE_CODE)}"
    assert {"heclave.he", "heclave.graph", "heclave.protocol", "heclave.tee"} <= ours and "tenseal" in imported
