"""``heclave bench`` end to end through the command line: every report key, accurate results, and the Ray rows
skipped with a clear sentence where Ray is not installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from heclave.cli import main

HECLAVE = str(Path(sys.executable).parent / "heclave")
INSTALL_RAY = "pip install 'heclave[ray]'"

VERIFICATION_KEYS = {
    "latency_ms_verified",
    "latency_ms_unverified",
    "latency_overhead",
    "enclave_ms_verified",
    "enclave_ms_unverified",
    "enclave_overhead",
    "within_bounds",
}
LINEAR_KEYS = {"ours_ms", "tenseal_ms", "floor_ms", "rotations", "max_rel_err", "speedup_vs_tenseal", "ours_over_floor"}


def test_bench_linear_reports_every_key_and_an_accurate_layer() -> None:
    result = CliRunner().invoke(main, ["bench", "linear", "--in", "64", "--out", "10", "--json", "--tenseal-runs", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert LINEAR_KEYS <= report.keys()
    assert report["max_rel_err"] <= 1e-4
    assert report["tenseal_ms"] > 0 and report["ours_ms"] > 0 and report["floor_ms"] > 0


def test_bench_scale_reports_throughput_per_worker_count_and_exact_results() -> None:
    args = [
        "bench",
        "scale",
        "--workers",
        "1,2",
        "--backend",
        "processes",
        "--model",
        "tutorial-cnn",
        "--clients",
        "2",
        "--requests",
        "1",
        "--batch",
        "2",
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["workers"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["images_per_s"] > 0 and run["latency_ms_p50"] > 0 and run["agreement"] == 1.0
    projection = report["projection"][0]
    assert projection["enclave_bound_at_workers"] > 0 and projection["images_per_s_at_64_workers"] > 0


def test_bench_placements_reports_every_strategy_with_what_it_exposes() -> None:
    result = CliRunner().invoke(main, ["bench", "placements", "--requests", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    by_name = {s["name"]: s for s in report["strategies"]}
    assert set(by_name) == {"full-enclave", "slalom", "origami", "ennclave", "heclave-he"}
    for strategy in by_name.values():
        assert {"name", "latency_ms", "enclave_share", "exposes"} <= strategy.keys()
        # Verified server layers add flooding noise to the logits (reported); an untrained network's top two
        # logits can lie closer than that, so only noise-free strategies must agree on every label.
        noise = strategy["release_noise_sd"]
        assert strategy["max_abs_logit_error"] < max(1e-3, 8 * noise), strategy
        assert strategy["agreement"] == 1.0 or noise > 0, strategy
    assert by_name["heclave-he"]["exposes"] == [] and by_name["full-enclave"]["exposes"] == []
    assert any("input" in item for item in by_name["ennclave"]["exposes"])
    assert by_name["full-enclave"]["enclave_share"] == 1.0


def test_bench_cnn_reports_what_verification_costs_in_the_same_run() -> None:
    args = ["bench", "cnn", "--samples", "2", "--tenseal-runs", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Random weights leave the first image's two largest logits 4e-4 apart: CKKS noise may swap them.
    assert report["max_abs_logit_error"] <= 0.05 and report["ours_ms"] > 0
    verification = report["verification"]
    assert VERIFICATION_KEYS <= verification.keys()
    for key in VERIFICATION_KEYS - {"within_bounds", "latency_overhead", "enclave_overhead"}:
        assert math.isfinite(verification[key]) and verification[key] > 0, key
    for key in ("latency_overhead", "enclave_overhead"):
        assert math.isfinite(verification[key]) and verification[key] > -1, key
    assert isinstance(verification["within_bounds"], bool)


def _without_ray(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes, the server's children too, fail to import Ray as if it were
    not installed: a package named ray ahead of the real one on the path that raises ImportError."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('ray is hidden from this test')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}


def test_bench_scale_without_ray_runs_the_other_rows_and_says_what_it_skipped(tmp_path) -> None:
    args = ["bench", "scale", "--workers", "1", "--model", "tutorial-cnn", "--clients", "1", "--requests", "1"]
    done = subprocess.run(
        [HECLAVE, *args, "--batch", "1", "--json"],
        env=_without_ray(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["backend"], r["workers"]) for r in report["runs"]] == [("processes", 1)]
    assert report["runs"][0]["agreement"] == 1.0 and report["projection"][0]["model"] == "tutorial-cnn"
    assert [(s["backend"], s["workers"]) for s in report["skipped"]] == [("ray", 1)]
    assert "Skipped the 1 ray row(s) (tutorial-cnn at 1 worker(s))" in done.stderr
    assert INSTALL_RAY in done.stderr and "Traceback" not in done.stderr


def test_a_server_asked_for_ray_without_it_says_how_to_install_it(tmp_path) -> None:
    done = subprocess.run(
        [HECLAVE, "server", "--ray", "local", "--spawn-enclave", "--key-file", str(tmp_path / "server.key")],
        env=_without_ray(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and INSTALL_RAY in done.stderr and "Traceback" not in done.stderr, done.stderr
