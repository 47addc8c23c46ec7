"""Models that are graphs (a small ResNet, a squeeze-and-excitation gate) through the real enclave and server
processes, against torch; the skip connections and the gate are the enclave's exact steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, assert_released_close
from tests.plan.test_graph_import import SqueezeExcite, TinyResNet, _batch_norms_with_statistics

CASES = [
    ("tiny-resnet, all he", lambda: _batch_norms_with_statistics(TinyResNet()), (1, 6, 6), None),
    # Every placement reads a value the enclave kept: the blinded shortcut reads the block's input.
    (
        "tiny-resnet, mixed",
        lambda: _batch_norms_with_statistics(TinyResNet()),
        (1, 6, 6),
        ["he", "enclave", "he", "he", "blinded", "he", "plain"],
    ),
    ("squeeze-excite", SqueezeExcite, (1, 4, 4), None),
]


@pytest.mark.parametrize("case_id, factory, shape, placements", CASES, ids=[c[0] for c in CASES])
def test_a_graph_model_agrees_with_torch_through_the_parties(cluster, case_id, factory, shape, placements):
    torch.manual_seed(7)
    model = factory().eval()
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        plan = owner.plan(model, shape, "encrypted", placements=placements)
        model_id = owner.deploy(plan, readers=[DATA_OWNER.public])
        x = np.random.default_rng().standard_normal((2, *shape))
        inference = data_owner.infer_batch(model_id, x)
        again = data_owner.infer_batch(model_id, x[:1])
    finally:
        data_owner.close()
        owner.close()
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(x)).numpy()
    assert_released_close(inference, expected)
    assert_released_close(again, expected[:1])
