"""Every placement and mixes of them, through the real processes, against plaintext on fresh inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from heclave.arith.blinding import HALF, P, activation_scale, centred, quantize
from heclave.arith.sparse import SparseMatrix
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


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e-6, 1.0, 1e3, 1e6]),
)
def test_blinding_is_exact_in_the_field_even_at_the_edges_of_its_range(rows, cols, seed, magnitude):
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (rows, cols))
    bits = 12
    w_q = quantize(w, bits)
    sparse = SparseMatrix.from_dense(w_q)
    x = rng.uniform(-magnitude, magnitude, cols)
    s = activation_scale(sparse.abs_row_sums, x)
    x_q = np.round(x * 2.0**s).astype(np.int64)
    r = rng.integers(0, P, cols, dtype=np.int64)
    blinded = sparse.apply_mod(np.mod(x_q + r, P))
    unblinded = centred(np.mod(blinded - sparse.apply_mod(r), P))
    exact = centred(w_q) @ x_q  # the true integer result, which must not have wrapped
    assert np.abs(exact).max(initial=0) < HALF
    assert (unblinded == exact).all()


def test_quantize_refuses_values_beyond_the_field():
    with pytest.raises(PlanError, match="fraction bits"):
        quantize(np.array([1.0]), 30)


def test_field_products_are_exact_for_long_rows_of_large_elements():
    rng = np.random.default_rng(3)
    w = rng.integers(0, P, (2, 70_000), dtype=np.int64)
    v = rng.integers(0, P, 70_000, dtype=np.int64)
    want = [sum(int(a) * int(b) for a, b in zip(row, v)) % P for row in w]
    assert SparseMatrix.from_dense(w).apply_mod(v).tolist() == want


def _sealed_secrets(planned) -> dict:
    """What a model owner seals to the enclave at registration (``ModelOwner``'s own code)."""
    weights, biases = ModelOwner._enclave_secrets(planned)
    return {"weights": weights, "biases": biases, "masks": ModelOwner._masks(planned)}


def test_pads_precomputed_between_requests_unblind_exactly(keys):
    from heclave.graph.placement import Form
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import POOL_SIZE, ModelRuntime
    from heclave.tee.requests import Request

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    planned = plan_pytorch(net, (6,), placements=["blinded", "enclave"])
    runtime = ModelRuntime.from_secrets(planned.graph, keys, _sealed_secrets(planned))
    while runtime.refill():
        pass
    assert len(runtime.pool[0]) == POOL_SIZE
    xs = np.random.default_rng().normal(size=(2, 6))
    request = Request("model", "request", None, 2)
    form, frames, offline_ms = runtime.handout(request, 0, xs)
    assert form is Form.BLINDED and len(runtime.pool[0]) == POOL_SIZE - 2 and offline_ms > 0
    blinded = np.frombuffer(frames[0], dtype="<i8").reshape(2, -1)
    server_side = np.stack([runtime.weights[0].apply_mod(row) for row in blinded])  # what the server computes
    last, hidden = runtime.accept(request, Form.BLINDED, [server_side.astype("<i8").tobytes()])
    _, logits = runtime.advance(last + 1, hidden)
    want = net.double()(torch.from_numpy(xs)).detach().numpy()
    assert np.abs(logits - want).max() < 1e-3


@pytest.mark.parametrize("blob", [None, b"", np.zeros(4).tobytes()], ids=["missing", "empty", "short"])
def test_enclave_refuses_an_he_stage_without_its_bias(keys, blob):
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import ModelRuntime

    planned = plan_pytorch(nn.Sequential(nn.Linear(6, 5)).eval(), (6,))
    secrets = _sealed_secrets(planned)
    secrets["biases"] = {} if blob is None else {"0": blob}
    with pytest.raises(PlanError, match="bias of 5 float64 values"):
        ModelRuntime.from_secrets(planned.graph, keys, secrets)


def test_he_layouts_leave_the_bias_to_the_enclave(keys):
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import ModelRuntime

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    planned = plan_pytorch(net, (256,))
    assert [s.layout.cols for s in planned.graph.stages] == [256, 64]
    runtime = ModelRuntime.from_secrets(planned.graph, keys, _sealed_secrets(planned))
    for i, w in enumerate(planned.weights):
        np.testing.assert_array_equal(runtime.biases[i], w[:, -1])
        x = np.random.default_rng().normal(size=(1, w.shape[1] - 1))
        # The enclave's copy of W (for checking the server) is W without the bias column.
        np.testing.assert_allclose(runtime.weights[i].apply(x), x @ w[:, :-1].T, rtol=1e-12, atol=1e-12)
