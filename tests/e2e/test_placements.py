"""Every placement and mixes of them, through the real processes, against plaintext on fresh inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.protocol.errors import PlanError
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(48, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    ).eval()


PLANS = {
    "he": ["he", "he", "he"],
    "enclave": ["enclave", "enclave", "enclave"],
    "blinded": ["blinded", "blinded", "blinded"],
    "plain": ["plain", "plain", "plain"],
    "origami": ["blinded", "plain", "plain"],
    "ennclave": ["plain", "enclave", "enclave"],
    "mixed": ["he", "blinded", "enclave"],
    "plain-middle": ["he", "plain", "he"],
}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(11)
    return small_cnn()


@pytest.mark.parametrize("name", PLANS)
def test_placement_plan_matches_plaintext(cluster, model, name):
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    model_id = owner.deploy(
        owner.plan(model, (1, 8, 8), "encrypted", placements=PLANS[name]), readers=[DATA_OWNER.public]
    )
    owner.close()
    x = np.random.default_rng().uniform(0, 1, (3, 1, 8, 8))
    want = model.double()(torch.from_numpy(x)).detach().numpy()
    data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV, allow_plain_input=True)
    inference = data_owner.infer_batch(model_id, x)
    got = inference.batch_logits
    data_owner.close()
    # Blinded layers are exact in their fixed-point quantization; everything else is exact up to CKKS noise
    # and the release's flooding noise (tee.release), which must stay small.
    tolerance = 2e-3 if "blinded" in PLANS[name] else 1e-3
    scale = np.abs(want).max() + 1
    assert inference.noise_sd < 2e-3 * scale
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() < tolerance * scale + 6 * inference.noise_sd


def test_wrong_number_of_placements_is_refused(cluster, model):
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    with pytest.raises(PlanError, match="3 stages but 2 placements"):
        owner.plan(model, (1, 8, 8), placements=["he", "plain"])
    with pytest.raises(PlanError, match="Unknown placement"):
        owner.plan(model, (1, 8, 8), placements=["he", "gpu", "he"])
    owner.close()
