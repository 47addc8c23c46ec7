"""``heclave bench linear`` end to end through the command line: every report key, and an accurate layer."""

from __future__ import annotations

import json

from click.testing import CliRunner

from parties.cli import main

LINEAR_KEYS = {"ours_ms", "tenseal_ms", "floor_ms", "rotations", "max_rel_err", "speedup_vs_tenseal", "ours_over_floor"}


def test_bench_linear_reports_every_key_and_an_accurate_layer() -> None:
    result = CliRunner().invoke(main, ["bench", "linear", "--in", "64", "--out", "10", "--json", "--tenseal-runs", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert LINEAR_KEYS <= report.keys()
    assert report["max_rel_err"] <= 1e-4
    assert report["tenseal_ms"] > 0 and report["ours_ms"] > 0 and report["floor_ms"] > 0
