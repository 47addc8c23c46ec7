"""Every exact enclave step against torch, its wire form, and a hostile server's crafted steps.

The numpy steps (``arith.nonlinear``) are compared with torch's own modules and
functions on fresh random float64 inputs, including values far in the
saturating tails; a step's wire form must round-trip, and anything a hostile
server could craft must be a :class:`PlanError`, never a crash or a huge
allocation. One end-to-end test runs a model with several of them through the
real enclave and server processes.
"""

from __future__ import annotations

import math
import zlib

import msgpack
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heclave.arith.nonlinear import apply_ops
from heclave.graph.ops import FIELDS, EnclaveOp, OpKind
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.protocol.errors import PlanError
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER

K = OpKind
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

# (id, step, torch's layer on the batched tensor, input shape scale)
CASES = [
    ("relu", EnclaveOp(K.RELU, (3, 5)), nn.ReLU(), 4.0),
    ("relu6", EnclaveOp(K.RELU6, (40,)), nn.ReLU6(), 8.0),
    ("leaky-relu", EnclaveOp(K.LEAKY_RELU, (40,), slope=0.2), nn.LeakyReLU(0.2), 4.0),
    ("leaky-relu-negative", EnclaveOp(K.LEAKY_RELU, (40,), slope=-1.5), nn.LeakyReLU(-1.5), 4.0),
    ("elu", EnclaveOp(K.ELU, (2, 20), alpha=0.7), nn.ELU(0.7), 6.0),
    ("sigmoid", EnclaveOp(K.SIGMOID, (60,)), nn.Sigmoid(), 30.0),
    ("tanh", EnclaveOp(K.TANH, (60,)), nn.Tanh(), 10.0),
    ("gelu-erf", EnclaveOp(K.GELU, (60,)), nn.GELU(), 6.0),
    ("gelu-tanh", EnclaveOp(K.GELU, (60,), approximate="tanh"), nn.GELU(approximate="tanh"), 6.0),
    ("silu", EnclaveOp(K.SILU, (60,)), nn.SiLU(), 30.0),
    ("hardswish", EnclaveOp(K.HARDSWISH, (60,)), nn.Hardswish(), 5.0),
    ("hardsigmoid", EnclaveOp(K.HARDSIGMOID, (60,)), nn.Hardsigmoid(), 5.0),
    ("softmax-0", EnclaveOp(K.SOFTMAX, (3, 4, 5), dim=0), nn.Softmax(dim=1), 5.0),
    ("softmax-last", EnclaveOp(K.SOFTMAX, (3, 4, 5), dim=2), nn.Softmax(dim=-1), 5.0),
    ("softmax-large", EnclaveOp(K.SOFTMAX, (12,)), nn.Softmax(dim=1), 800.0),
    ("log-softmax", EnclaveOp(K.LOG_SOFTMAX, (3, 4, 5), dim=1), nn.LogSoftmax(dim=2), 5.0),
    ("log-softmax-large", EnclaveOp(K.LOG_SOFTMAX, (12,)), nn.LogSoftmax(dim=1), 800.0),
    ("layer-norm-1", EnclaveOp(K.LAYER_NORM, (3, 4, 5), axes=1, eps=1e-3), nn.LayerNorm(5, 1e-3, False), 3.0),
    ("layer-norm-2", EnclaveOp(K.LAYER_NORM, (3, 4, 5), axes=2), nn.LayerNorm((4, 5), bias=False), 3.0),
    ("layer-norm-all", EnclaveOp(K.LAYER_NORM, (3, 4), axes=2, eps=0.0), nn.LayerNorm((3, 4), 0.0, False), 3.0),
    ("maxpool", EnclaveOp(K.MAXPOOL2D, (2, 7, 8), (2, 2), (2, 2)), nn.MaxPool2d(2), 1.0),
    (
        "maxpool-all-options",
        EnclaveOp(K.MAXPOOL2D, (2, 9, 8), (3, 2), (2, 1), (1, 1), (2, 3), True),
        nn.MaxPool2d((3, 2), (2, 1), (1, 1), (2, 3), ceil_mode=True),
        1.0,
    ),
    ("adaptive", EnclaveOp(K.ADAPTIVE_MAXPOOL2D, (2, 7, 9), output_size=(3, 4)), nn.AdaptiveMaxPool2d((3, 4)), 1.0),
    ("adaptive-global", EnclaveOp(K.ADAPTIVE_MAXPOOL2D, (3, 5, 4), output_size=(1, 1)), nn.AdaptiveMaxPool2d(1), 1.0),
    (
        "adaptive-same",
        EnclaveOp(K.ADAPTIVE_MAXPOOL2D, (1, 5, 6), output_size=(5, 6)),
        nn.AdaptiveMaxPool2d((None, 6)),
        1.0,
    ),
]
IDS = [c[0] for c in CASES]


def _compare(op: EnclaveOp, layer, x: torch.Tensor) -> None:
    """The step's numpy result against torch's, within float64 rounding of the output's scale."""
    with torch.no_grad():
        expected = layer.double()(x[None])[0].numpy()
    got = apply_ops(x.numpy().copy(), (op,))
    assert expected.shape == op.out_shape
    assert got.shape == (expected.size,)
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected.reshape(-1)).max() <= 1e-12 * scale


@pytest.mark.parametrize("case_id, op, layer, scale", CASES, ids=IDS)
def test_each_step_agrees_with_torch(case_id, op, layer, scale):
    generator = torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
    for _ in range(3):
        _compare(op, layer, scale * torch.randn(op.in_shape, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("case_id, op, layer, scale", CASES, ids=IDS)
def test_each_step_round_trips_its_wire_form(case_id, op, layer, scale):
    wire = op.to_wire()
    assert set(wire) == {"kind", "in_shape", *FIELDS.get(op.kind, ())}
    assert EnclaveOp.from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False)) == op


def test_every_kind_is_tested():
    assert {c[1].kind for c in CASES} == set(OpKind)


@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    s=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    p=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    ceil=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@QUICK
def test_any_maxpool_geometry_is_torchs_or_refused(h, w, k, s, p, d, ceil, seed):
    layer = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
    x = torch.randn((2, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    try:
        with torch.no_grad():
            layer(x[None])
    except RuntimeError:
        with pytest.raises(PlanError):
            EnclaveOp(K.MAXPOOL2D, (2, h, w), k, s, p, d, ceil)
        return
    _compare(EnclaveOp(K.MAXPOOL2D, (2, h, w), k, s, p, d, ceil), layer, x)


@given(
    h=st.integers(1, 15),
    w=st.integers(1, 15),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    channels=st.integers(1, 3),
)
@QUICK
def test_any_adaptive_maxpool_is_torchs(h, w, data, seed, channels):
    size = (data.draw(st.integers(1, h)), data.draw(st.integers(1, w)))
    x = torch.randn((channels, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _compare(EnclaveOp(K.ADAPTIVE_MAXPOOL2D, (channels, h, w), output_size=size), nn.AdaptiveMaxPool2d(size), x)


# ---------------------------------------------------------------- hostile wire forms

POOL = {"kind": "maxpool2d", "in_shape": [2, 8, 8], "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}
POOL |= {"dilation": [1, 1], "ceil_mode": False}
HOSTILE = [
    ("not-a-dict", ["relu", [4]]),
    ("unknown-kind", {"kind": "exp", "in_shape": [4]}),
    ("kind-not-a-string", {"kind": 3, "in_shape": [4]}),
    ("missing-shape", {"kind": "relu"}),
    ("foreign-field", {"kind": "relu", "in_shape": [4], "kernel": [2, 2]}),
    ("missing-field", {"kind": "softmax", "in_shape": [4]}),
    ("negative-axis-length", {"kind": "relu", "in_shape": [4, -3]}),
    ("zero-axis-length", {"kind": "relu", "in_shape": [0]}),
    ("float-axis-length", {"kind": "relu", "in_shape": [4.0]}),
    ("bool-axis-length", {"kind": "relu", "in_shape": [True]}),
    ("string-shape", {"kind": "relu", "in_shape": "4"}),
    ("nested-shape", {"kind": "relu", "in_shape": [[4]]}),
    ("empty-shape", {"kind": "relu", "in_shape": []}),
    ("too-many-axes", {"kind": "relu", "in_shape": [1] * 9}),
    ("too-many-values", {"kind": "tanh", "in_shape": [1 << 12, 1 << 12]}),
    ("huge-integer", {"kind": "tanh", "in_shape": [10**40]}),
    ("dim-out-of-range", {"kind": "softmax", "in_shape": [3, 4], "dim": 2}),
    ("dim-negative", {"kind": "log_softmax", "in_shape": [3, 4], "dim": -1}),
    ("dim-float", {"kind": "softmax", "in_shape": [3, 4], "dim": 1.0}),
    ("axes-zero", {"kind": "layer_norm", "in_shape": [3, 4], "axes": 0, "eps": 1e-5}),
    ("axes-too-many", {"kind": "layer_norm", "in_shape": [3, 4], "axes": 3, "eps": 1e-5}),
    ("eps-negative", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": -1e-5}),
    ("eps-nan", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": math.nan}),
    ("eps-huge-int", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": 10**400}),
    ("eps-string", {"kind": "layer_norm", "in_shape": [4], "axes": 1, "eps": "1e-5"}),
    ("slope-inf", {"kind": "leaky_relu", "in_shape": [4], "slope": math.inf}),
    ("slope-bool", {"kind": "leaky_relu", "in_shape": [4], "slope": True}),
    ("alpha-list", {"kind": "elu", "in_shape": [4], "alpha": [1.0]}),
    ("gelu-form", {"kind": "gelu", "in_shape": [4], "approximate": "erf"}),
    ("gelu-form-type", {"kind": "gelu", "in_shape": [4], "approximate": ["tanh"]}),
    ("pool-flat-input", POOL | {"in_shape": [64]}),
    ("pool-absurd-kernel", POOL | {"kernel": [10**9, 10**9]}),
    (
        "pool-absurd-padding",
        POOL | {"kernel": [10**6, 10**6], "padding": [5 * 10**5, 5 * 10**5], "in_shape": [1, 1, 1]},
    ),
    ("pool-padding-over-half", POOL | {"padding": [2, 0]}),
    ("pool-zero-stride", POOL | {"stride": [0, 1]}),
    ("pool-zero-dilation", POOL | {"dilation": [1, 0]}),
    ("pool-negative-kernel", POOL | {"kernel": [-2, 2]}),
    ("pool-three-sides", POOL | {"kernel": [2, 2, 2]}),
    ("pool-ceil-int", POOL | {"ceil_mode": 1}),
    ("pool-too-much-work", POOL | {"in_shape": [16, 512, 512], "kernel": [16, 16], "stride": [1, 1]}),
    ("adaptive-larger", {"kind": "adaptive_maxpool2d", "in_shape": [2, 4, 4], "output_size": [5, 4]}),
    ("adaptive-zero", {"kind": "adaptive_maxpool2d", "in_shape": [2, 4, 4], "output_size": [0, 4]}),
]


@pytest.mark.parametrize("case_id, wire", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_crafted_step_is_refused(case_id, wire):
    with pytest.raises(PlanError):
        EnclaveOp.from_wire(wire)


WIRE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


NAMES = sorted({"kind", "in_shape", *(f for names in FIELDS.values() for f in names)})


@given(case=st.sampled_from(CASES), data=st.data(), value=WIRE_VALUES, drop=st.booleans())
@QUICK
def test_a_mutated_step_is_refused_or_still_a_valid_step(case, data, value, drop):
    """Any one field replaced, added or dropped: a PlanError, or a step that runs on its declared shape."""
    wire = case[1].to_wire()
    if drop:
        wire.pop(data.draw(st.sampled_from(sorted(wire))))
    else:
        wire[data.draw(st.sampled_from(NAMES) | st.text(max_size=8))] = value
    try:
        op = EnclaveOp.from_wire(wire)
    except PlanError:
        return
    assert EnclaveOp.from_wire(op.to_wire()) == op
    x = np.random.default_rng(0).standard_normal(math.prod(op.in_shape))
    with np.errstate(all="ignore"):
        assert apply_ops(x, (op,)).shape == (math.prod(op.out_shape),)


# ---------------------------------------------------------------- end to end


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
    got = np.stack([np.asarray(r["logits"]) for r in inference.results])
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(x)).numpy()
    spread = expected.max() - expected.min()
    # The release carries flooding noise (tee.release) sized by the enclave's checks, then rounding to 1e-4.
    assert inference.noise_sd < 1e-3
    assert np.abs(got - expected).max() < 1e-3 * spread + 6 * inference.noise_sd + 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
