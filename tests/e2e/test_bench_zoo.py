"""``heclave bench zoo`` as a user runs it (a subprocess): the models that plan are measured through the real
processes and agree with torch; a model the planner refuses is a row saying why, and the command still succeeds.
The runs without a deployment are in-process, which saves starting torch again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from heclave.cli import main
from heclave.protocol.errors import PlanError

HECLAVE = str(Path(sys.executable).parent / "heclave")
MEASURED = {
    "deploy_s",
    "latency_ms_p50",
    "server_he_ms_per_image",
    "enclave_ms_per_image",
    "enclave_share",
    "agreement",
    "max_abs_logit_error",
    "max_logit_error_over_range",
    "plaintext_ms",
    "rotations_per_image",
    "bytes_per_image",
}


def test_planned_models_are_measured_and_a_refused_one_is_a_row_with_its_reason():
    args = ("--model", "breast-cancer-mlp", "--model", "digits-cnn", "--model", "vgg16", "--samples", "8", "--json")
    done = subprocess.run([HECLAVE, "bench", "zoo", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {row["model"]: row for row in report["models"]}
    assert list(rows) == ["breast-cancer-mlp", "digits-cnn", "vgg16"]
    for name in ("breast-cancer-mlp", "digits-cnn"):
        row = rows[name]
        assert row["status"] == "planned" and row["trained"], row
        assert MEASURED <= row.keys()
        assert row["agreement"] == 1.0, row
        assert row["latency_ms_p50"] > 0 and row["server_he_ms_per_image"] > 0 and row["enclave_ms_per_image"] > 0
        assert 0 < row["enclave_share"] < 1
        # What differs from torch is the release's flooding noise, a few thousandths of a logit.
        assert row["max_abs_logit_error"] <= max(1e-3, 8 * row["release_noise_sd"]), row
    refused = rows["vgg16"]
    assert refused["status"] == "refused" and refused["refused_at"] == "planning"
    assert "layer '0' (Conv2d)" in refused["reason"] and "too large to compose exactly" in refused["reason"]
    assert not MEASURED & refused.keys()


def test_a_table_with_only_refusals_still_succeeds():
    result = CliRunner().invoke(main, ["bench", "zoo", "--model", "mobilenetv2"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "mobilenetv2, refused at planning: layer '0' (Conv2d): an affine map of 32768x3072" in result.stdout


def test_an_unknown_model_is_refused_with_the_names_of_the_zoo():
    result = CliRunner().invoke(main, ["bench", "zoo", "--model", "resnet-20"])
    assert isinstance(result.exception, PlanError)
    assert "'resnet-20' is not a model of the zoo; choose from resnet20, vgg16" in result.exception.message
