"""Every layer kind heclave imports, run encrypted and compared with torch in float64.

Each case builds a small model with fresh random parameters (batch-norm
statistics included), plans it for one weight form, runs it through the real
kernels and enclave steps (``helpers.run_encrypted``) and compares with the
model itself on a fresh random input. Unsupported models must be refused with a
:class:`PlanError` that names the offending layer.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from heclave.arith.nonlinear import apply_ops
from heclave.graph.ops import OpKind
from heclave.graph.placement import WeightForm
from heclave.plan import from_pytorch, plan_pytorch
from heclave.protocol.errors import PlanError
from tests.helpers import run_encrypted

TARGET = 1e-4  # max abs error over max abs of the reference output
FORMS = [WeightForm.PLAIN, WeightForm.ENCRYPTED]


# ---------------------------------------------------------------- models


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding them is really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.7)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2.0 + 0.3)
                if m.affine:
                    sign = torch.where(torch.rand(n, generator=gen) < 0.3, -1.0, 1.0)
                    m.weight.copy_(sign * (torch.rand(n, generator=gen) + 0.5))
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model


class TorchFlatten(nn.Module):
    """A custom forward with ``torch.relu`` and ``torch.flatten``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.flatten(x, 1)
        return self.fc(x)


class ViewFlatten(nn.Module):
    """``x.view(x.size(0), -1)`` and ``F.relu``, with max-pooling in between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, (3, 2), padding=(1, 0))
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * 4 * 3, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        x = x.view(x.size(0), -1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class ReshapeFlatten(nn.Module):
    """``x.reshape(x.shape[0], -1)``, the ``relu`` method and a batch-norm between convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 3 * 3, 4)

    def forward(self, x):
        x = self.bn(self.conv1(x)).relu()
        x = self.conv2(x)
        x = x.reshape(x.shape[0], -1)
        return self.fc(x)


class LeNet(nn.Module):
    """Every supported kind in one chain."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(6 * 2 * 2, 16)
        self.bn2 = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.drop(F.relu(self.bn2(self.fc1(x))))
        return self.fc2(x)


def negative_before_padded_maxpool() -> nn.Module:
    """Every pooled value negative: padding with zeros instead of -inf would change the maxima."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.MaxPool2d(3, stride=2, padding=1))
    with torch.no_grad():
        model[0].bias.fill_(-20.0)
    return model


# (id, factory, input shape, number of stages the plan must have)
CASES = [
    # dense
    ("linear", lambda: nn.Sequential(nn.Linear(7, 5)), (7,), 1),
    ("linear-one-input", lambda: nn.Sequential(nn.Linear(1, 3)), (1,), 1),
    ("linear-widening", lambda: nn.Sequential(nn.Linear(6, 41)), (6,), 1),
    ("linear-no-bias", lambda: nn.Sequential(nn.Linear(9, 4, bias=False)), (9,), 1),
    ("linear-chain-composed", lambda: nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5)), (8,), 1),
    (
        "mlp-relu",
        lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)),
        (10,),
        3,
    ),
    ("ends-with-relu", lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU()), (5,), 1),
    (
        "dropout-identity",
        lambda: nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.4), nn.Identity(), nn.ReLU(), nn.Linear(6, 2)),
        (6,),
        2,
    ),
    # convolutions: stride, padding, channels, non-square kernels
    ("conv-3x3", lambda: nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 6, 6), 1),
    ("conv-s2-p1", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1)), (3, 9, 9), 1),
    ("conv-s3-p2-2x3", lambda: nn.Sequential(nn.Conv2d(2, 3, (2, 3), stride=3, padding=2)), (2, 10, 11), 1),
    ("conv-s21-p01-3x1", lambda: nn.Sequential(nn.Conv2d(3, 2, (3, 1), stride=(2, 1), padding=(0, 1))), (3, 7, 6), 1),
    ("conv-s1-p2-5x5", lambda: nn.Sequential(nn.Conv2d(2, 5, 5, padding=2)), (2, 6, 6), 1),
    ("conv-s3-p0-no-bias", lambda: nn.Sequential(nn.Conv2d(1, 3, 2, stride=3, bias=False)), (1, 8, 7), 1),
    ("conv-s2-p2-1x4", lambda: nn.Sequential(nn.Conv2d(4, 2, (1, 4), stride=2, padding=2)), (4, 5, 6), 1),
    ("conv-groups-dilation", lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)), (4, 6, 6), 1),
    (
        "conv-relu-conv",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 2, stride=1, padding=1)
        ),
        (2, 7, 7),
        2,
    ),
    # average pooling: merged into the neighbouring affine work
    (
        "avgpool-after-conv",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
        ),
        (2, 8, 8),
        2,
    ),
    (
        "avgpool-before-linear",
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
        ),
        (1, 9, 9),
        2,
    ),
    (
        "avgpool-first",
        lambda: nn.Sequential(nn.AvgPool2d((2, 3), stride=(2, 1)), nn.Flatten(), nn.Linear(2 * 3 * 4, 3)),
        (2, 6, 6),
        1,
    ),
    (
        "avgpool-exclude-pad",
        lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)),
        (2, 7, 7),
        1,
    ),
    # max pooling: an enclave step, with and without padding, stride != kernel
    (
        "maxpool-2",
        lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)),
        (1, 8, 8),
        2,
    ),
    (
        "maxpool-k3-s2-p1",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 4),
        ),
        (2, 7, 7),
        2,
    ),
    ("maxpool-k2-s1", lambda: nn.Sequential(nn.Conv2d(2, 2, 2), nn.MaxPool2d(2, stride=1)), (2, 6, 5), 1),
    (
        "maxpool-k32-s12-p10",
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.MaxPool2d((3, 2), stride=(1, 2), padding=(1, 0)),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 6 * 3, 3),
        ),
        (1, 8, 8),
        2,
    ),
    ("maxpool-padding-negative", negative_before_padded_maxpool, (2, 6, 7), 1),
    (
        "maxpool-k3-s3-p1",
        lambda: nn.Sequential(
            nn.Conv2d(3, 2, 1), nn.MaxPool2d(3, stride=3, padding=1), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)
        ),
        (3, 8, 8),
        2,
    ),
    # batch-norm folded
    (
        "bn2d-after-conv",
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)),
        (2, 7, 7),
        1,
    ),
    ("bn2d-first", lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 2)), (3, 5, 5), 1),
    (
        "bn2d-no-affine",
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, affine=False), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
        ),
        (1, 6, 6),
        2,
    ),
    (
        "bn1d-after-linear",
        lambda: nn.Sequential(nn.Linear(12, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 4)),
        (12,),
        2,
    ),
    ("bn1d-first", lambda: nn.Sequential(nn.BatchNorm1d(7), nn.Linear(7, 3)), (7,), 1),
    ("flatten-linear", lambda: nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)), (2, 3, 3), 1),
    # custom forwards
    ("custom-torch-flatten", TorchFlatten, (2, 8, 8), 2),
    ("custom-view", ViewFlatten, (1, 8, 7), 3),
    ("custom-reshape", ReshapeFlatten, (3, 8, 8), 2),
    ("custom-lenet", LeNet, (1, 12, 12), 4),
]


def _seed(*parts: str) -> int:
    """A seed of its own for every case and weight form."""
    return zlib.crc32("/".join(parts).encode())


def _build(case_id: str, factory, form: WeightForm) -> tuple[nn.Module, torch.Generator]:
    gen = torch.Generator().manual_seed(_seed(case_id, form.value))
    with torch.random.fork_rng():
        torch.manual_seed(_seed(case_id, form.value, "init"))
        model = factory()
    return randomize_batchnorm(model, gen), gen


def _reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(x[None]).reshape(-1).numpy()


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.value)
@pytest.mark.parametrize("case_id, factory, shape, stages", CASES, ids=[c[0] for c in CASES])
def test_layer_matches_torch(keys, case_id, factory, shape, stages, form):
    model, gen = _build(case_id, factory, form)
    model.train()  # the importer must evaluate as in eval mode whatever mode it is handed
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    expected = _reference(model, x)

    plan = plan_pytorch(model, shape, weight_form=form.value)
    assert plan.graph.weight_form is form
    assert len(plan.graph.stages) == stages, plan.summary()
    assert plan.graph.output_size == expected.size

    # The composed affine maps alone are exact (float64), before any encryption.
    plain = x.numpy().reshape(-1)
    for stage, w in zip(plan.graph.stages, plan.weights):
        plain = apply_ops(w @ np.append(plain, 1.0), stage.ops)
    assert _relative_error(plain, expected) <= 1e-10

    got = run_encrypted(keys, plan.graph, plan.weights, x.numpy())
    err = _relative_error(got, expected)
    assert err <= TARGET, f"{case_id} ({form.value}): relative error {err:.2e}"


def test_importer_leaves_the_model_untouched():
    model = randomize_batchnorm(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), torch.Generator().manual_seed(7))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_pytorch(model, (4,))
    assert model.training
    assert next(model.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_average_pooling_costs_no_stage_of_its_own():
    """AvgPool2d is folded into the convolution before it: the composed map has the pooled output shape."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    imported = from_pytorch(model, (2, 8, 8))
    (first, first_ops), (second, second_ops) = imported.stages
    assert first.out_shape == (3, 4, 4)
    assert first.weight.shape == (48, 128)
    assert [op.kind for op in first_ops] == [OpKind.RELU]
    assert second.weight.shape == (4, 48) and second_ops == []


def test_maxpool_step_keeps_torch_geometry():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d((3, 2), stride=(1, 2), padding=(1, 0)))
    ((_, ops),) = from_pytorch(model, (1, 9, 8)).stages
    (op,) = ops
    assert op.kind is OpKind.MAXPOOL2D
    assert (op.kernel, op.stride, op.padding) == ((3, 2), (1, 2), (1, 0))
    with torch.no_grad():
        assert op.out_shape == tuple(model(torch.zeros(1, 1, 9, 8)).shape[1:])


# ---------------------------------------------------------------- refusals


class Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class SoftplusCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.softplus(self.fc(x))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        return self.fc(x)


# (id, model, input shape, strings the message must contain)
REFUSED = [
    ("softplus", nn.Sequential(nn.Linear(4, 3), nn.Softplus()), (4,), ["'1'", "Softplus"]),
    ("prelu", nn.Sequential(nn.Linear(4, 3), nn.PReLU(), nn.Linear(3, 2)), (4,), ["'1'", "PReLU"]),
    ("softmax-over-batch", nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=0)), (4,), ["'1'", "Softmax", "batch"]),
    ("lstm-in-sequential", nn.Sequential(nn.LSTM(4, 3)), (5, 4), ["'0'", "LSTM"]),
    ("lstm-custom", Lstm(), (5, 4), ["'lstm'", "LSTM"]),
    ("conv3d", nn.Sequential(nn.Conv3d(2, 3, 3)), (2, 4, 4, 4), ["'0'", "Conv3d"]),
    (
        "maxpool-indices",
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, return_indices=True)),
        (1, 7, 7),
        ["'1'", "MaxPool2d", "return_indices"],
    ),
    ("functional-softplus", SoftplusCall(), (4,), ["softplus"]),
    ("two-inputs", TwoInputs(), (4,), ["one input"]),
    ("wrong-input-shape", nn.Sequential(nn.Linear(4, 3)), (5,), ["'0'", "Linear", "(5,)"]),
    ("not-a-module", lambda x: x, (4,), ["nn.Module"]),
]


@pytest.mark.parametrize("case_id, model, shape, needles", REFUSED, ids=[c[0] for c in REFUSED])
def test_unsupported_model_is_refused_naming_the_layer(case_id, model, shape, needles):
    with pytest.raises(PlanError) as info:
        plan_pytorch(model, shape)
    for needle in needles:
        assert needle in str(info.value), f"{case_id}: {needle!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("first", [nn.ReLU(), nn.MaxPool2d(2)], ids=["relu", "maxpool"])
def test_model_starting_with_a_nonlinearity_is_refused(first):
    model = nn.Sequential(first, nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
    with pytest.raises(PlanError, match="must start with a linear layer"):
        plan_pytorch(model, (2, 4, 4) if isinstance(first, nn.MaxPool2d) else (2, 2, 2))


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.value)
@pytest.mark.parametrize(
    "case_id, factory, shape",
    [("bare-linear", lambda: nn.Linear(5, 3), (5,)), ("bare-conv2d", lambda: nn.Conv2d(1, 2, 3, stride=2), (1, 6, 6))],
    ids=["linear", "conv2d"],
)
def test_a_single_layer_model_is_imported(keys, case_id, factory, shape, form):
    """A bare layer, not wrapped in nn.Sequential: fx would trace into its forward."""
    layer, gen = _build(case_id, factory, form)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    plan = plan_pytorch(layer, shape, weight_form=form)
    assert len(plan.graph.stages) == 1
    got = run_encrypted(keys, plan.graph, plan.weights, x.numpy())
    assert _relative_error(got, _reference(layer, x)) <= TARGET
