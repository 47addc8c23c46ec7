"""A model larger than one buffer may be: Orion's LeNet for MNIST through the real enclave, server and workers.

Its server-side weights are 210 MB as plain matrices (one of 157 MB) and 140 MB as 595 encrypted diagonals,
its bundle more than ``MAX_BUFFER_BYTES``: both forms deploy as streams of bounded frames, with progress, agree
with torch on fresh random inputs, and a restarted server reloads their bundles from disk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from heclave.parties.bundles import SUFFIX
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.plan.importer import from_pytorch
from heclave.plan.planner import plan_model
from heclave.protocol.messages import MAX_BUFFER_BYTES
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER

INPUT_SHAPE = (1, 28, 28)
FORMS = ("plain", "encrypted")


def lenet() -> nn.Module:
    """Orion's LeNet for MNIST (``models/lenet.py`` there), with random weights; its last layer's scaled so the
    logits span a few units, as a trained model's do (torch's initialisation leaves them within about 0.1,
    where the release's flooding noise of encrypted weights, about 0.016 here, would decide the label)."""
    net = nn.Sequential(
        nn.Conv2d(1, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(32, 64, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3136, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    with torch.no_grad():
        net[7].weight.mul_(20)
        net[7].bias.mul_(20)
    return net


@pytest.fixture(scope="module")
def large(cluster_with):
    """A cluster of its own, whose server the last test restarts, with the LeNet deployed in both weight forms:
    ``(cluster, torch model, {form: model id}, {form: progress reports})``."""
    torch.manual_seed(9)
    net = lenet().eval()
    imported = from_pytorch(net, INPUT_SHAPE)  # once: importing the convolutions is most of planning's time
    with cluster_with() as cluster:
        owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
        ids, reports = {}, {}
        try:
            for form in FORMS:
                plan = plan_model(imported, form, params=owner.connection.params)
                reports[form] = []
                ids[form] = owner.deploy(plan, [DATA_OWNER.public], progress=lambda *r, f=form: reports[f].append(r))
        finally:
            owner.close()
        yield cluster, net.double(), ids, reports


def _inputs(net: nn.Module, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh random images whose two largest logits differ by a tenth of their range, so that the label is well
    defined under the release's noise."""
    rng = np.random.default_rng()
    xs, ys = [], []
    while len(xs) < count:
        x = rng.normal(size=INPUT_SHAPE)
        with torch.no_grad():
            y = net(torch.from_numpy(x)[None])[0].numpy()
        top = np.sort(y)[-2:]
        if top[1] - top[0] > 0.1 * (y.max() - y.min()):
            xs.append(x.ravel())
            ys.append(y)
    return np.stack(xs), np.stack(ys)


def _agrees(cluster, net: nn.Module, model_id: str) -> None:
    """Two fresh random inputs through the real processes: the label torch gives, and its logits up to the
    release's allowance (1e-3 of the logits' range, the flooding noise, the rounding to 1e-4)."""
    xs, want = _inputs(net, 2)
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        inferences = [owner.infer(model_id, x) for x in xs]
    finally:
        owner.close()
    for inference, expected in zip(inferences, want):
        spread = expected.max() - expected.min()
        assert np.abs(inference.logits - expected).max() < 1e-3 * spread + 6 * inference.noise_sd + 1e-4
        assert np.argmax(inference.logits) == np.argmax(expected)


@pytest.mark.parametrize("form", FORMS)
def test_the_lenet_deploys_in_bounded_frames_with_progress_and_agrees_with_torch(large, form):
    cluster, net, ids, reports = large
    bundle = cluster.workdir / "server-state" / "models" / f"{ids[form]}{SUFFIX}"
    assert bundle.stat().st_size > MAX_BUFFER_BYTES, "the model is meant to be larger than one buffer may be"
    prepared = [r for r in reports[form] if r[0] == "prepare"]
    uploaded = [r for r in reports[form] if r[0] == "upload"]
    assert prepared[-1][1] == prepared[-1][2] == (595 if form == "encrypted" else 4)
    assert len(uploaded) > 4 and uploaded[-1][1] == uploaded[-1][2] > MAX_BUFFER_BYTES
    _agrees(cluster, net, ids[form])


def test_a_restarted_server_reloads_the_large_bundles_from_disk(large):
    cluster, net, ids, _ = large
    cluster.restart_server()
    for form in FORMS:
        _agrees(cluster, net, ids[form])
