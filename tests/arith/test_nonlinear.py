"""Every exact enclave step (``arith.nonlinear``) against torch.

The numpy steps are compared with torch's own modules and functions on fresh
random float64 inputs, including values far in the saturating tails. Their
wire forms, and a hostile server's crafted steps, are checked in
``tests/graph/test_ops.py``; a model with several of them runs through the real
processes in ``tests/e2e/test_nonlinearities.py``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heclave.arith.nonlinear import apply_ops
from heclave.graph.ops import EnclaveOp, OpKind
from heclave.protocol.errors import PlanError

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


def test_every_kind_is_tested():
    assert {c[1].kind for c in CASES} | {c[1] for c in COMBINING} == set(OpKind)


# (id, kind, activation shape, operand shape, concat axis, operand first, torch's operation)
COMBINING = [
    ("add", OpKind.ADD, (3, 4, 4), (3, 4, 4), 0, False, lambda x, y: x + y),
    ("add-broadcast", OpKind.ADD, (3, 4, 4), (3, 1, 1), 0, False, lambda x, y: x + y),
    ("mul-gate", OpKind.MUL, (3, 4, 4), (3, 1, 1), 0, False, lambda x, y: x * y),
    ("mul-gate-first", OpKind.MUL, (3, 1, 1), (3, 4, 4), 0, False, lambda x, y: x * y),
    ("concat-channels", OpKind.CONCAT, (3, 4, 4), (2, 4, 4), 0, False, lambda x, y: torch.cat([x, y], 1)),
    ("concat-before", OpKind.CONCAT, (5,), (2,), 0, True, lambda x, y: torch.cat([y, x], 1)),
    ("concat-width", OpKind.CONCAT, (2, 3, 4), (2, 3, 1), 2, False, lambda x, y: torch.cat([x, y], 3)),
]


@pytest.mark.parametrize("case", COMBINING, ids=[c[0] for c in COMBINING])
def test_each_combining_step_agrees_with_torch(case):
    _, kind, shape, other, axis, before, torch_op = case
    joined = {"dim": axis, "before": before} if kind is OpKind.CONCAT else {}
    op = EnclaveOp(kind, shape, operand=4, operand_shape=other, **joined)
    generator = torch.Generator().manual_seed(zlib.crc32(case[0].encode()))
    x = torch.randn((1, *shape), generator=generator, dtype=torch.float64)
    y = torch.randn((1, *other), generator=generator, dtype=torch.float64)
    want = torch_op(x, y)[0]
    got = apply_ops(x.numpy().reshape(-1), (op,), {4: y.numpy().reshape(-1)})
    assert op.out_shape == tuple(want.shape)
    assert np.abs(got - want.numpy().reshape(-1)).max() <= 1e-15 * max(1.0, float(want.abs().max()))


def test_a_combining_step_without_its_value_at_hand_is_refused():
    op = EnclaveOp(OpKind.ADD, (4,), operand=3, operand_shape=(4,))
    with pytest.raises(PlanError, match="value 3"):
        apply_ops(np.zeros(4), (op,), {2: np.zeros(4)})


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
            pooled = layer(x[None])
    except RuntimeError:
        pooled = None
    if pooled is None or not torch.isfinite(pooled).all():  # torch refuses, or a window sees only padding
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
