"""The enclave's trusted computing base stays small: tee, he, protocol and six libraries, never torch.

zstandard reads the server's SEAL frames, which SEAL compresses with zstd (``he.sealformat``).
"""

from __future__ import annotations

import json
import subprocess
import sys

ALLOWED = {
    "cryptography",
    "msgpack",
    "numpy",
    "tenseal",
    "zmq",
    "zstandard",
    "he",
    "protocol",
    "tee",
    "cython_runtime",
}


def test_the_enclave_program_imports_only_its_allowed_dependencies():
    probe = (
        "import json, sys, tee.__main__, tee.enclave;"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules if not m.startswith('_')}"
        " - set(sys.stdlib_module_names))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = set(json.loads(done.stdout))
    assert imported <= ALLOWED, f"the enclave imports {sorted(imported - ALLOWED)}"
    assert {"he", "protocol", "tee", "tenseal"} <= imported
