"""The `heclave` command line: enclave measurement, runtimes and policy flags, as a user calls them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from heclave.protocol.identity import Identity
from tests.tee.test_measure import sigstruct

HECLAVE = str(Path(sys.executable).parent / "heclave")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HECLAVE, *args], capture_output=True, text=True, timeout=120)


def test_measure_prints_what_owners_pin(tmp_path):
    (tmp_path / "heclave-enclave.sig").write_bytes(sigstruct(b"\x5a" * 32, 3, 9, b"\x01" * 384))
    done = run("enclave", "--measure", "--gramine-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["mrenclave"] == "5a" * 32 and (report["isv_prod_id"], report["isv_svn"]) == (3, 9)


def test_measure_without_a_build_says_how_to_build(tmp_path):
    done = run("enclave", "--measure", "--gramine-dir", str(tmp_path))
    assert done.returncode == 1 and "SGX=1" in done.stderr


def test_gramine_runtime_refuses_unmeasured_arguments():
    done = run("enclave", "--runtime", "gramine-sgx", "--bind", "tcp://127.0.0.1:1")
    assert done.returncode == 2 and "measured manifest" in done.stderr


def test_owner_commands_refuse_a_malformed_pinned_measurement(tmp_path):
    key = tmp_path / "server.key"
    key.write_text("x" * 40)
    identity = tmp_path / "me.key"
    Identity.generate().save(identity)
    done = run(
        "data-owner",
        "infer",
        "--server",
        "tcp://127.0.0.1:1",
        "--server-key",
        str(key),
        "--identity",
        str(identity),
        "--mrenclave",
        "abc",
        "--model-id",
        "m",
        "--input",
        str(key),
    )
    assert done.returncode == 1 and "64 hexadecimal" in done.stderr
