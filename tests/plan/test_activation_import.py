"""Importing torch's nonlinearities: every module and functional form becomes the right exact enclave step, the
imported chain computes what the model computes, and LayerNorm's weights stay out of the public graph."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from heclave.graph.model import ModelGraph
from heclave.graph.ops import OpKind
from heclave.plan import from_pytorch, plan_pytorch
from heclave.plan.assessment import cut_functions
from heclave.plan.importer import ImportedModel
from heclave.protocol.errors import PlanError
from tests.helpers import run_imported

K = OpKind


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random LayerNorm weights and biases, so that folding them is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or isinstance(model, Functional) and name in ("w", "b"):
                p.copy_(torch.randn(p.shape, generator=gen) + (1.0 if name.endswith("w") else 0.0))
    return model


def _agrees(model: nn.Module, shape: tuple[int, ...], seed: int) -> ImportedModel:
    imported = from_pytorch(model, shape)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            expected = model.double()(x[None]).reshape(-1).numpy()
        got = run_imported(imported, x.numpy())
        assert np.abs(got - expected).max() <= 1e-10 * max(1.0, np.abs(expected).max())
    return imported


class Functional(nn.Module):
    """``fc2(fn(fc1(x)))`` with ``fn`` a functional or method form, traced into the graph by torch.fx."""

    def __init__(self, fn, width: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fn = nn.Linear(6, width), nn.Linear(width, 3), fn
        self.w, self.b = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return self.fc2(self.fn(self, self.fc1(x)))


def _mlp(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), layer, nn.Linear(8, 3))


MLP_CASES = [
    ("relu6", nn.ReLU6(), K.RELU6),
    ("leaky-relu", nn.LeakyReLU(0.3), K.LEAKY_RELU),
    ("elu", nn.ELU(0.5), K.ELU),
    ("sigmoid", nn.Sigmoid(), K.SIGMOID),
    ("tanh", nn.Tanh(), K.TANH),
    ("gelu", nn.GELU(), K.GELU),
    ("gelu-tanh", nn.GELU("tanh"), K.GELU),
    ("silu", nn.SiLU(), K.SILU),
    ("hardswish", nn.Hardswish(), K.HARDSWISH),
    ("hardsigmoid", nn.Hardsigmoid(), K.HARDSIGMOID),
    ("softmax", nn.Softmax(dim=-1), K.SOFTMAX),
    ("softmax-implicit-dim", nn.Softmax(), K.SOFTMAX),
    ("log-softmax", nn.LogSoftmax(dim=1), K.LOG_SOFTMAX),
    ("layer-norm-plain", nn.LayerNorm(8, elementwise_affine=False), K.LAYER_NORM),
]
FUNCTIONAL_CASES = [
    ("F.relu6", lambda m, x: F.relu6(x), K.RELU6),
    ("F.relu-inplace", lambda m, x: F.relu(x, inplace=True), K.RELU),
    ("torch.relu", lambda m, x: torch.relu(x), K.RELU),
    ("F.leaky_relu", lambda m, x: F.leaky_relu(x, 0.2), K.LEAKY_RELU),
    ("F.elu", lambda m, x: F.elu(x, alpha=0.3), K.ELU),
    ("torch.sigmoid", lambda m, x: torch.sigmoid(x), K.SIGMOID),
    ("F.sigmoid", lambda m, x: F.sigmoid(x), K.SIGMOID),
    ("torch.tanh", lambda m, x: torch.tanh(x), K.TANH),
    ("F.gelu", lambda m, x: F.gelu(x), K.GELU),
    ("F.gelu-tanh", lambda m, x: F.gelu(x, approximate="tanh"), K.GELU),
    ("F.silu", lambda m, x: F.silu(x), K.SILU),
    ("F.hardswish", lambda m, x: F.hardswish(x), K.HARDSWISH),
    ("F.hardsigmoid", lambda m, x: F.hardsigmoid(x), K.HARDSIGMOID),
    ("F.softmax", lambda m, x: F.softmax(x, dim=1), K.SOFTMAX),
    ("torch.softmax", lambda m, x: torch.softmax(x, -1), K.SOFTMAX),
    ("F.log_softmax", lambda m, x: F.log_softmax(x, -1), K.LOG_SOFTMAX),
    ("torch.log_softmax", lambda m, x: torch.log_softmax(x, 1), K.LOG_SOFTMAX),
    ("F.layer_norm", lambda m, x: F.layer_norm(x, (8,), eps=1e-3), K.LAYER_NORM),
    ("F.layer_norm-weights", lambda m, x: F.layer_norm(x, [8], m.w, m.b), K.LAYER_NORM),
    ("x.relu", lambda m, x: x.relu(), K.RELU),
    ("x.sigmoid", lambda m, x: x.sigmoid(), K.SIGMOID),
    ("x.tanh", lambda m, x: x.tanh(), K.TANH),
    ("x.softmax", lambda m, x: x.softmax(-1), K.SOFTMAX),
    ("x.log_softmax", lambda m, x: x.log_softmax(dim=1), K.LOG_SOFTMAX),
]


@pytest.mark.parametrize("case_id, layer, kind", MLP_CASES, ids=[c[0] for c in MLP_CASES])
def test_each_module_imports_as_its_step(case_id, layer, kind):
    imported = _agrees(_mlp(layer), (6,), zlib.crc32(case_id.encode()))
    assert [[op.kind for op in ops] for _, ops in imported.stages] == [[kind], []]


@pytest.mark.parametrize("case_id, fn, kind", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES])
def test_each_functional_form_imports_as_its_step(case_id, fn, kind):
    seed = zlib.crc32(case_id.encode())
    imported = _agrees(_randomize(Functional(fn), seed), (6,), seed)
    assert [[op.kind for op in ops] for _, ops in imported.stages] == [[kind], []]


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 2, 4)

    def forward(self, x):
        x = F.max_pool2d(self.conv(x), 3, 1, 1, 2, True)
        x = torch.max_pool2d(x, 2, ceil_mode=True)
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, (None, 2)), 1))


CONV_CASES = [
    (
        "maxpool-dilation-ceil",
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), nn.Flatten()),
        [K.MAXPOOL2D],
    ),
    ("adaptive", nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveMaxPool2d((2, 3)), nn.Flatten()), [K.ADAPTIVE_MAXPOOL2D]),
    ("channel-softmax", nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softmax(dim=1), nn.Flatten()), [K.SOFTMAX]),
    ("image-layer-norm", nn.Sequential(nn.Conv2d(2, 3, 3), nn.LayerNorm([3, 7, 7]), nn.Flatten()), [K.LAYER_NORM]),
    ("functional-pools", Pools(), [K.MAXPOOL2D, K.MAXPOOL2D, K.ADAPTIVE_MAXPOOL2D]),
]


@pytest.mark.parametrize("case_id, model, kinds", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_image_steps_import_with_their_geometry(case_id, model, kinds):
    seed = zlib.crc32(case_id.encode())
    imported = _agrees(_randomize(model, seed), (2, 9, 9), seed)
    assert [op.kind for op in imported.stages[0][1]] == kinds


def test_layer_norm_weights_join_the_next_affine_layer_and_stay_out_of_the_graph():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 5), nn.GELU(), nn.Linear(5, 4), nn.LayerNorm(4)
    )
    _randomize(model, 5)
    imported = _agrees(model, (6,), 6)
    assert [[op.kind for op in ops] for _, ops in imported.stages] == [[K.LAYER_NORM], [K.GELU], [K.LAYER_NORM], []]
    second, last = imported.stages[1][0], imported.stages[3][0]
    assert second.weight.shape == (5, 8) and len(second.names) == 2  # LayerNorm's scale, then the Linear
    # At the end, the scale and shift are an affine stage of their own: a diagonal map.
    assert last.in_shape == last.out_shape == (4,)
    gamma, beta = (t.detach().double().numpy() for t in (model[5].weight, model[5].bias))
    np.testing.assert_allclose(last.weight, np.diag(gamma), rtol=0, atol=0)
    np.testing.assert_allclose(last.bias, beta, rtol=0, atol=0)
    assert (last.support[:, :-1] == np.eye(4, dtype=bool)).all() and last.support[:, -1].all()
    graph = plan_pytorch(model, (6,)).graph
    wire = graph.to_bytes()
    assert ModelGraph.from_bytes(wire) == graph
    for value in (*gamma, *beta, *model[1].weight.detach().double().numpy()):
        assert struct.pack(">d", value) not in wire and struct.pack(">f", value) not in wire


def test_a_step_before_another_step_keeps_the_layer_norm_weights_in_a_stage_of_their_own():
    model = _randomize(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2)), 9)
    imported = _agrees(model, (6,), 10)
    assert [[op.kind for op in ops] for _, ops in imported.stages] == [[K.LAYER_NORM], [K.TANH], []]


def test_the_assessments_view_of_each_cut_is_the_imported_chain():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 5),
        nn.LogSoftmax(dim=1),
        nn.Linear(5, 3),
    )
    imported = from_pytorch(_randomize(model, 11), (1, 5, 5))
    x = torch.randn((4, 1, 5, 5), generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for depth, (_, view) in enumerate(cut_functions(imported)):
        expected = np.stack([run_imported(imported, v, depth) if depth else v.reshape(-1) for v in x.numpy()])
        np.testing.assert_allclose(view(x).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


REFUSED = [
    ("softmax-over-batch", lambda m, x: F.softmax(x, 0), ["'softmax'", "batch"]),
    ("softmax-dtype", lambda m, x: torch.softmax(x, 1, dtype=torch.int64), ["softmax", "dtype"]),
    ("dim-out-of-range", lambda m, x: x.softmax(2), ["softmax", "dim 2"]),
    ("layer-norm-shape", lambda m, x: F.layer_norm(x, (4,)), ["layer_norm", "(4,)", "(8,)"]),
    ("gelu-form", lambda m, x: F.gelu(x, approximate="fast"), ["gelu", "fast"]),
    ("computed-slope", lambda m, x: F.leaky_relu(x, x.size(1)), ["leaky_relu", "negative_slope", "constant"]),
]


@pytest.mark.parametrize("case_id, fn, needles", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_step_heclave_cannot_compute_is_refused_naming_the_layer(case_id, fn, needles):
    with pytest.raises(PlanError) as info:
        from_pytorch(Functional(fn), (6,))
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"


def test_implicit_softmax_dim_over_images_is_refused():
    with pytest.raises(PlanError, match="explicit integer dim"):
        from_pytorch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softmax()), (1, 5, 5))


def test_a_bare_nonlinearity_must_follow_an_affine_layer():
    with pytest.raises(PlanError, match="must start with a linear layer"):
        from_pytorch(nn.GELU(), (4,))
