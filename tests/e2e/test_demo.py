"""`heclave demo` as a user runs it: the JSON report, and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

HECLAVE = str(Path(sys.executable).parent / "heclave")


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_demo_json_report_has_the_documented_keys_and_full_agreement():
    done = subprocess.run([HECLAVE, "demo", "--samples", "12", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    for key in (
        "samples",
        "accuracy_plaintext",
        "accuracy_encrypted",
        "agreement",
        "max_abs_logit_error",
        "release_noise_sd",
        "latency_ms_p50",
        "latency_ms_p95",
        "enclave_share",
    ):
        assert key in report
    assert report["samples"] == 12 and report["agreement"] == 1.0
    # The flooding noise is what the logits may differ by beyond CKKS's own error, and it is small.
    assert 0 < report["release_noise_sd"] < 1e-2
    assert report["max_abs_logit_error"] < 1e-3 + 6 * report["release_noise_sd"]
    assert 0 < report["enclave_share"] < 1 and report["latency_ms_p50"] <= report["latency_ms_p95"]


def test_ctrl_c_stops_the_demo_and_its_children():
    demo = subprocess.Popen(
        [HECLAVE, "demo", "--samples", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test run started in the background inherits an ignored SIGINT, which Python keeps; a user's Ctrl-C
        # reaches a terminal's foreground process, which never has it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while len(_children_of(demo.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    children = _children_of(demo.pid)
    assert len(children) == 2, "the demo did not start an enclave and a server"
    time.sleep(1.0)
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=60)
    assert demo.returncode == 130, err[-2000:]
    assert "interrupted" in err
    time.sleep(0.5)
    alive = [
        pid
        for pid in children
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    ]
    assert alive == [], "children outlived the demo"
