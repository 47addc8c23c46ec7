"""A model with several exact enclave steps (GELU, sigmoid, LayerNorm, softmax) through the real enclave and
server processes, against torch. Each step alone is checked in ``tests/arith/test_nonlinear.py``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, assert_released_close


def test_an_mlp_with_gelu_sigmoid_layer_norm_and_softmax_agrees_with_torch_through_the_parties(cluster):
    """The real enclave and server processes; ``he`` stages (one of them LayerNorm's own scale and shift), an
    ``enclave`` stage, and a ``plain`` last stage whose softmax the server computes."""
    torch.manual_seed(15)
    model = nn.Sequential(
        nn.Linear(10, 16),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Linear(16, 12),
        nn.Sigmoid(),
        nn.Linear(12, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 4),
        nn.Softmax(dim=-1),
    )
    with torch.no_grad():
        for norm in (model[1], model[6]):
            norm.weight.normal_(1.0, 0.5)
            norm.bias.normal_(0.0, 0.5)
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        plan = owner.plan(model, (10,), "encrypted", placements=["he", "he", "enclave", "he", "plain"])
        assert [row["enclave"] for row in plan.summary()] == ["layer_norm", "gelu", "sigmoid", "layer_norm", "softmax"]
        model_id = owner.deploy(plan, readers=[DATA_OWNER.public])
        x = np.random.default_rng(16).standard_normal((3, 10))
        inference = data_owner.infer_batch(model_id, x)
    finally:
        data_owner.close()
        owner.close()
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(x)).numpy()
    assert inference.noise_sd < 1e-3
    assert_released_close(inference, expected)
