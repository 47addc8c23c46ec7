"""The privacy assessment on a tiny model: real attacks, SSIM in [0, 1], high at the input, lower after pooling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from heclave.plan import from_pytorch
from heclave.plan.assessment import Budget, assess, psnr, ssim
from heclave.workloads import INPUT_SHAPE, digits_split


def test_ssim_and_psnr_behave_at_the_extremes():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 8, 8))
    assert ssim(image, image) > 0.999 and psnr(image, image) == float("inf")
    noise = rng.uniform(0, 1, (1, 8, 8))
    assert 0.0 <= ssim(image, noise) < 0.5 and psnr(image, noise) < 15


def test_assessment_scores_every_cut_and_pooling_hides_more_than_the_identity():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(8, 10)
    ).eval()
    x_train, x_test, _, _ = digits_split()
    report = assess(
        from_pytorch(model, INPUT_SHAPE),
        x_train[:600],
        x_test,
        Budget(decoder_epochs=15, rmle_steps=60, rmle_images=8),
        threshold=0.5,
    )
    cuts = report["cuts"]
    assert [c["depth"] for c in cuts] == [0, 1]
    for cut in cuts:
        for scores in cut["attacks"].values():
            assert 0.0 <= scores["ssim"] <= 1.0
    assert cuts[0]["max_ssim"] > 0.8
    assert cuts[1]["max_ssim"] < cuts[0]["max_ssim"]
    assert {a["name"] for a in report["attacks"]} == {"decoder", "optimisation"}
    assert all(isinstance(c["below_threshold"], bool) for c in cuts)


def test_assess_command_writes_the_figure_and_json(tmp_path):
    heclave = str(Path(sys.executable).parent / "heclave")
    figure = tmp_path / "assessment.png"
    done = subprocess.run(
        [heclave, "assess", "digits-cnn", "--epochs", "3", "--steps", "10", "--json", "--figure", str(figure)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["threshold"] is None and len(report["cuts"]) == 3
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
