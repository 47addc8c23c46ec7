"""Choosing placements: the cheapest plan under the protections asked for, or a refusal that says why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

from heclave.graph.placement import Placement, WeightForm
from heclave.plan import from_pytorch
from heclave.plan.calibration import Calibration, PlaintextCosts
from heclave.plan.costs import UnitCosts
from heclave.plan.search import cheapest
from heclave.protocol.errors import PlanError

COSTS = Calibration(UnitCosts(), PlaintextCosts())


@pytest.fixture(scope="module")
def imported():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10), nn.ReLU(), nn.Linear(10, 4)
    ).eval()
    return from_pytorch(model, (1, 8, 8))


def test_protecting_nothing_runs_everything_in_plain(imported):
    best = cheapest(imported, set(), COSTS, WeightForm.ENCRYPTED, enclave_budget=1.0)
    assert best.placements == (Placement.PLAIN,) * 3 and best.enclave_share == 0.0


def test_protecting_weights_never_hands_the_server_weights(imported):
    for budget in (1.0, 0.9):
        best = cheapest(imported, {"weights"}, COSTS, WeightForm.ENCRYPTED, enclave_budget=budget)
        assert set(best.placements) <= {Placement.HE, Placement.ENCLAVE}
    with pytest.raises(PlanError):
        cheapest(imported, {"weights"}, COSTS, WeightForm.PLAIN, enclave_budget=0.0)


def test_protecting_the_input_forbids_plain_layers_without_an_assessment(imported):
    best = cheapest(imported, {"input"}, COSTS, WeightForm.ENCRYPTED, enclave_budget=1.0)
    assert Placement.PLAIN not in best.placements


def test_an_assessment_below_the_threshold_allows_plain_after_that_cut(imported):
    cut_ssim = {0: 0.99, 1: 0.95, 2: 0.1}
    best = cheapest(imported, {"input"}, COSTS, WeightForm.ENCRYPTED, 1.0, cut_ssim, threshold=0.3)
    assert best.placements[2] in (Placement.PLAIN, Placement.ENCLAVE)
    assert Placement.PLAIN not in best.placements[:2]


def test_an_impossible_budget_is_refused_with_the_reason(imported):
    with pytest.raises(PlanError, match=r"enclave share of 0\.01.*lowest possible"):
        cheapest(imported, {"input", "weights"}, COSTS, WeightForm.ENCRYPTED, enclave_budget=0.01)
    with pytest.raises(PlanError, match="Unknown protections"):
        cheapest(imported, {"outputs"}, COSTS, WeightForm.ENCRYPTED, enclave_budget=1.0)


def test_plan_command_writes_a_plan_file_with_prediction_and_exposure(tmp_path):
    heclave = str(Path(sys.executable).parent / "heclave")
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [
            heclave,
            "plan",
            "digits-cnn",
            "--protect",
            "input,weights",
            "--enclave-budget",
            "0.9",
            "--out",
            str(out),
            "--json",
            "--calibration",
            str(tmp_path / "none.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(out.read_text())
    assert plan["format"] == 1 and len(plan["placements"]) == 3 and plan["exposes"] == []
    assert plan["predicted_enclave_share"] <= 0.9 and plan["predicted_latency_ms"] > 0


def test_calibration_measures_positive_costs_and_round_trips(tmp_path):
    from heclave.plan.calibration import calibrate

    measured = calibrate(enclave_factor=3.0)
    assert all(v > 0 for v in measured.he.__dict__.values()) and measured.he.enclave_factor == 3.0
    assert measured.he.rotation > measured.he.multiply_plain  # a rotation is a key switch; a product is not
    path = tmp_path / "costs.json"
    measured.save(path)
    assert Calibration.load(path) == measured


def test_encrypted_weight_mask_follows_the_architecture_not_trained_zeros():
    from heclave.graph.layouts.cyclic import CyclicLayout
    from heclave.graph.params import CkksParams
    from heclave.he.context import SecretKeySet
    from heclave.he.linear import encrypt_weights

    context = SecretKeySet(CkksParams()).public
    g = CyclicLayout(rows=4, cols=7, slots=4096, k=4, period=8, chunk=7, baby=4, giant=1)
    pruned = np.zeros((4, 7))
    pruned[0, 0] = 1.0
    revealing, _ = encrypt_weights(context, g, pruned)
    hiding, frames = encrypt_weights(context, g, pruned, support=np.ones((4, 7), dtype=bool))
    assert revealing.sum() < hiding.sum() == len(frames)


def _plan_file(**changes) -> dict:
    from heclave.plan.plan_file import PlanFile

    planned = PlanFile("m.py:net", [1, 8, 8], "encrypted", 1, ["he", "enclave"], ["input"], 12.5, 0.4, [])
    return planned.to_json() | changes


def test_a_plan_file_round_trips(tmp_path):
    from heclave.plan.plan_file import PlanFile

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_file()))
    read = PlanFile.read(path)
    assert (read.placements, read.weights, read.batch) == (["he", "enclave"], "encrypted", 1)
    read.write(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == _plan_file()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"format": 2}, "format 1"),
        ({"placements": ["he", "gpu"]}, "placements"),
        ({"placements": []}, "placements"),
        ({"weights": "clear"}, "weights"),
        ({"batch": 0}, "batch"),
        ({"batch": True}, "batch"),
    ],
)
def test_a_plan_file_that_cannot_be_deployed_is_refused_naming_the_field(tmp_path, changes, field):
    from heclave.plan.plan_file import PlanFile

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_file(**changes)))
    with pytest.raises(PlanError, match=field):
        PlanFile.read(path)
