"""The affine layers beyond Linear and Conv2d: Conv1d, grouped (depthwise) and dilated convolutions, average
pooling (also adaptive), padding of every mode, interpolation, Unflatten, reshapes and permutations, as modules
and in their functional forms. Each imported chain computes what torch computes on fresh random inputs, the
structural support follows the architecture, and a model with all of them runs through the real processes."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.plan import from_pytorch, plan_pytorch
from heclave.plan.importer import ImportedModel
from heclave.protocol.errors import PlanError
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, run_encrypted, run_imported


class Around(nn.Module):
    """``last(fn(first(x)))``: ``fn`` is a functional or method form, traced into the graph by torch.fx."""

    def __init__(self, first: nn.Module, fn, last: nn.Module) -> None:
        super().__init__()
        self.first, self.fn, self.last = first, fn, last

    def forward(self, x):
        return self.last(self.fn(self.first(x)))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights, and batch-norm statistics far from the identity, so that folding them is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _agrees(model: nn.Module, shape: tuple[int, ...], seed: int) -> ImportedModel:
    """The imported chain, evaluated in numpy, agrees with torch within 1e-9 on three fresh random inputs."""
    imported = from_pytorch(model, shape)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        x = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            expected = model.double()(x[None]).reshape(-1).numpy()
        got = run_imported(imported, x.numpy())
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-9 * max(1.0, np.abs(expected).max())
    return imported


def _head(features: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(features, 3))


# (id, model factory, input shape): every model ends in a dense head after a ReLU, so the layer under test
# is composed into the first affine map and its output still reaches the result.
MODULE_CASES = [
    ("conv1d", lambda: nn.Sequential(nn.Conv1d(2, 4, 3), _head(4 * 8)), (2, 10)),
    (
        "conv1d-stride-padding-dilation-groups",
        lambda: nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), _head(6 * 6)),
        (4, 11),
    ),
    ("conv1d-depthwise", lambda: nn.Sequential(nn.Conv1d(3, 3, 5, padding=2, groups=3), _head(3 * 9)), (3, 9)),
    (
        "conv1d-circular-padding",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), _head(3 * 7)),
        (2, 7),
    ),
    (
        "conv1d-bn",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.BatchNorm1d(3), _head(3 * 6)),
        (2, 8),
    ),
    ("conv2d-depthwise", lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), _head(3 * 5 * 5)), (3, 5, 5)),
    (
        "conv2d-depthwise-multiplier",
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, groups=2), _head(4 * 3 * 3)),
        (2, 7, 7),
    ),
    ("conv2d-grouped", lambda: nn.Sequential(nn.Conv2d(4, 6, 1, groups=2), _head(6 * 3 * 3)), (4, 3, 3)),
    (
        "conv2d-dilated",
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, dilation=2, padding=2, stride=(1, 2)), _head(3 * 6 * 3)),
        (2, 6, 6),
    ),
    (
        "conv2d-dilated-reflect",
        lambda: nn.Sequential(nn.Conv2d(2, 2, 3, dilation=(2, 1), padding=(2, 1), padding_mode="reflect"), _head(32)),
        (2, 4, 4),
    ),
    (
        "depthwise-separable-bn",
        lambda: nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            _head(4 * 4 * 4),
        ),
        (3, 4, 4),
    ),
    ("avgpool1d", lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.AvgPool1d(2), _head(3 * 4)), (2, 10)),
    (
        "avgpool1d-padded-ceil",
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 1), nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), _head(15)
        ),
        (2, 9),
    ),
    (
        "adaptive-avgpool2d-global",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(4, 2)
        ),
        (2, 6, 6),
    ),
    (
        "adaptive-avgpool2d-uneven",
        lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d((2, 3)), _head(2 * 2 * 3)),
        (2, 5, 7),
    ),
    (
        "adaptive-avgpool1d",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.AdaptiveAvgPool1d(4), _head(3 * 4)),
        (2, 9),
    ),
    ("zeropad2d", lambda: nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(2, 3, 3), _head(3 * 3 * 5)), (2, 4, 4)),
    (
        "constantpad2d-nonzero",
        lambda: nn.Sequential(nn.ConstantPad2d(1, 0.75), nn.Conv2d(2, 3, 3), _head(3 * 4 * 4)),
        (2, 4, 4),
    ),
    ("reflectionpad2d", lambda: nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, 2, 3), _head(2 * 4 * 4)), (2, 4, 4)),
    ("replicationpad2d", lambda: nn.Sequential(nn.ReplicationPad2d(2), nn.Conv2d(2, 2, 3), _head(72)), (2, 4, 4)),
    ("circularpad2d", lambda: nn.Sequential(nn.CircularPad2d(1), nn.Conv2d(2, 2, 3), _head(2 * 4 * 4)), (2, 4, 4)),
    ("zeropad1d", lambda: nn.Sequential(nn.ZeroPad1d(2), nn.Conv1d(2, 2, 3), _head(2 * 8)), (2, 6)),
    ("constantpad1d", lambda: nn.Sequential(nn.ConstantPad1d((0, 1), -2.0), nn.Conv1d(2, 2, 3), _head(2 * 5)), (2, 6)),
    ("reflectionpad1d", lambda: nn.Sequential(nn.ReflectionPad1d(2), nn.Conv1d(2, 2, 3), _head(2 * 8)), (2, 6)),
    ("replicationpad1d", lambda: nn.Sequential(nn.ReplicationPad1d(1), nn.Conv1d(2, 2, 3), _head(2 * 6)), (2, 6)),
    ("circularpad1d", lambda: nn.Sequential(nn.CircularPad1d(1), nn.Conv1d(2, 2, 3), _head(2 * 6)), (2, 6)),
    (
        "upsample-nearest",
        lambda: nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2, 2, 3), _head(2 * 6 * 6)),
        (2, 4, 4),
    ),
    (
        "upsample-bilinear",
        lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.Upsample(size=(5, 7), mode="bilinear"), _head(2 * 5 * 7)),
        (2, 3, 4),
    ),
    (
        "upsample-bilinear-align-corners",
        lambda: nn.Sequential(nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(2, 2, 3), _head(2 * 4 * 4)),
        (2, 3, 3),
    ),
    (
        "upsample-linear-1d",
        lambda: nn.Sequential(nn.Conv1d(2, 2, 1), nn.Upsample(scale_factor=1.5, mode="linear"), _head(2 * 9)),
        (2, 6),
    ),
    (
        "unflatten",
        lambda: nn.Sequential(nn.Linear(12, 12), nn.Unflatten(1, (3, 4)), nn.Conv1d(3, 2, 3), _head(2 * 2)),
        (12,),
    ),
    (
        "conv1d-after-relu",
        lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Conv1d(2, 3, 3, dilation=2), _head(3 * 4)),
        (1, 10),
    ),
]


@pytest.mark.parametrize("case_id, factory, shape", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_each_module_agrees_with_torch(case_id, factory, shape):
    seed = zlib.crc32(case_id.encode())
    torch.manual_seed(seed)
    _agrees(_randomize(factory(), seed), shape, seed)


FLAT = nn.Flatten()
# (id, first layer, functional form, last layers, input shape)
FUNCTIONAL_CASES = [
    ("F.pad-zero", nn.Conv2d(2, 2, 1), lambda x: F.pad(x, (1, 0, 2, 1)), _head(2 * 6 * 5), (2, 3, 4)),
    ("F.pad-constant", nn.Conv2d(2, 2, 1), lambda x: F.pad(x, (1, 1), value=1.5), _head(2 * 3 * 6), (2, 3, 4)),
    ("F.pad-reflect", nn.Conv2d(2, 2, 1), lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), _head(60), (2, 3, 4)),
    ("F.pad-replicate", nn.Conv1d(2, 2, 1), lambda x: F.pad(x, (2, 1), mode="replicate"), _head(2 * 8), (2, 5)),
    ("F.pad-circular", nn.Conv1d(2, 2, 1), lambda x: F.pad(x, (1, 2), mode="circular"), _head(2 * 8), (2, 5)),
    ("F.interpolate-nearest", nn.Conv2d(2, 2, 1), lambda x: F.interpolate(x, scale_factor=2), _head(96), (2, 3, 4)),
    (
        "F.interpolate-nearest-exact",
        nn.Conv2d(2, 2, 1),
        lambda x: F.interpolate(x, size=(4, 8), mode="nearest-exact"),
        _head(2 * 4 * 8),
        (2, 3, 4),
    ),
    (
        "F.interpolate-bilinear",
        nn.Conv2d(2, 2, 1),
        lambda x: F.interpolate(x, scale_factor=(2, 1.5), mode="bilinear", align_corners=False),
        _head(2 * 6 * 6),
        (2, 3, 4),
    ),
    (
        "F.interpolate-bicubic",
        nn.Conv2d(2, 2, 1),
        lambda x: F.interpolate(x, size=(4, 5), mode="bicubic", align_corners=True),
        _head(2 * 4 * 5),
        (2, 3, 4),
    ),
    ("F.avg_pool1d", nn.Conv1d(2, 3, 1), lambda x: F.avg_pool1d(x, 2, stride=1), _head(3 * 5), (2, 6)),
    (
        "F.adaptive_avg_pool2d",
        nn.Conv2d(2, 4, 3),
        lambda x: F.adaptive_avg_pool2d(x, (1, 1)),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        (2, 5, 5),
    ),
    ("F.adaptive_avg_pool1d", nn.Conv1d(2, 3, 1), lambda x: F.adaptive_avg_pool1d(x, 3), _head(9), (2, 7)),
    ("torch.flatten", nn.Conv1d(2, 3, 1), lambda x: torch.flatten(x, 1), nn.Linear(12, 3), (2, 4)),
    ("torch.reshape", nn.Conv1d(2, 3, 1), lambda x: torch.reshape(x, (x.shape[0], -1)), nn.Linear(12, 3), (2, 4)),
    ("x.view", nn.Conv1d(2, 3, 1), lambda x: x.view(x.size(0), 2, 6), _head(12), (2, 4)),
    ("x.reshape", nn.Linear(6, 6), lambda x: x.reshape(-1, 3, 2), nn.Conv1d(3, 2, 1), (6,)),
    ("x.permute", nn.Conv1d(2, 3, 1), lambda x: x.permute(0, 2, 1), nn.Linear(3, 2), (2, 4)),
    ("x.transpose", nn.Conv2d(2, 3, 1), lambda x: x.transpose(1, 3), nn.Linear(3, 2), (2, 4, 5)),
    ("x.transpose-negative", nn.Conv1d(2, 3, 1), lambda x: x.transpose(-1, -2).contiguous(), nn.Linear(3, 2), (2, 4)),
    ("torch.permute", nn.Conv2d(2, 3, 1), lambda x: torch.permute(x, (0, 3, 1, 2)), _head(3 * 4 * 5), (2, 4, 5)),
    ("torch.transpose", nn.Conv1d(2, 3, 1), lambda x: torch.transpose(x, 1, 2), nn.Linear(3, 2), (2, 4)),
    ("x.contiguous", nn.Conv1d(2, 3, 1), lambda x: x.permute(0, 2, 1).contiguous().view(x.shape[0], -1), FLAT, (2, 4)),
    ("x.unflatten", nn.Linear(6, 6), lambda x: x.unflatten(1, (2, 3)), nn.Conv1d(2, 2, 2), (6,)),
    ("torch.unflatten", nn.Linear(6, 6), lambda x: torch.unflatten(x, -1, (3, -1)), nn.Conv1d(3, 2, 2), (6,)),
]


@pytest.mark.parametrize("case_id, first, fn, last, shape", FUNCTIONAL_CASES, ids=[c[0] for c in FUNCTIONAL_CASES])
def test_each_functional_form_agrees_with_torch(case_id, first, fn, last, shape):
    seed = zlib.crc32(case_id.encode())
    model = _randomize(Around(first, fn, last), seed)
    imported = _agrees(model, shape, seed)
    # The functional form joins the affine run around it: the only stage boundary is the head's ReLU, if any.
    assert len(imported.stages) == 1 + any(isinstance(m, nn.ReLU) for m in last.modules())


def _depthwise_support(channels: int, h: int, w: int, k: int, pad: int) -> np.ndarray:
    """Output ``(c, i, j)`` reads input ``(c, i + di - pad, j + dj - pad)`` inside the image, and nothing else."""
    expected = np.zeros((channels, h, w, channels, h, w), dtype=bool)
    for c in range(channels):
        for i in range(h):
            for j in range(w):
                for di in range(k):
                    for dj in range(k):
                        y, x = i + di - pad, j + dj - pad
                        if 0 <= y < h and 0 <= x < w:
                            expected[c, i, j, c, y, x] = True
    return expected.reshape(channels * h * w, channels * h * w)


def test_depthwise_support_is_block_sparse_and_ignores_the_trained_values():
    conv = nn.Conv2d(3, 3, 3, padding=1, groups=3)
    with torch.no_grad():
        conv.weight[1].zero_()  # a trained channel that happens to be all zeros
        conv.weight[2, 0, 1, 1] = 0.0
        conv.bias[0] = 0.0
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 5, 2))
    affine = from_pytorch(model, (3, 4, 5)).stages[0][0]
    expected = _depthwise_support(3, 4, 5, k=3, pad=1)
    np.testing.assert_array_equal(affine.weight_support, expected)
    assert affine.support[:, -1].all()  # every output channel has a bias, whatever its trained value
    # The trained map lies inside the structural support, and does have the zeros the support ignores.
    assert not (affine.weight[~expected]).any()
    assert (affine.weight[expected] == 0).sum() > 0
    # Each output channel reads only its own input channel's 4x5 window: three diagonal blocks.
    blocks = affine.weight_support.reshape(3, 20, 3, 20).any(axis=(1, 3))
    np.testing.assert_array_equal(blocks, np.eye(3, dtype=bool))


def test_padding_support_stays_within_each_channel():
    model = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, 2, 3, groups=2), nn.ReLU(), nn.Flatten())
    support = from_pytorch(model, (2, 3, 3)).stages[0][0].weight_support
    blocks = support.reshape(2, 9, 2, 9).any(axis=(1, 3))
    np.testing.assert_array_equal(blocks, np.eye(2, dtype=bool))
    reads = support.reshape(2, 3, 3, 2, 3, 3)[0, :, :, 0]  # channel 0: output (i, j) reads input (y, x)
    assert reads[1, 1].all()  # the centre's window is the whole image
    np.testing.assert_array_equal(reads[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])  # reflected, not zero-padded


def depthwise_net() -> nn.Module:
    """MobileNet's block in small: depthwise, pointwise, global average pooling, a dense head."""
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(2),
        nn.ReLU6(),
        nn.Conv2d(2, 4, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def test_a_depthwise_model_plans_and_computes_under_ckks(keys):
    torch.manual_seed(5)
    model = _randomize(depthwise_net(), 5)
    plan = plan_pytorch(model, (2, 6, 6))
    assert len(plan.graph.stages) == 3
    first = plan.supports[0][:, :-1].reshape(2, 36, 2, 36).any(axis=(1, 3))
    np.testing.assert_array_equal(first, np.eye(2, dtype=bool))
    x = torch.randn((2, 6, 6), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        expected = model.double()(x[None]).reshape(-1).numpy()
    got = run_encrypted(keys, plan.graph, plan.weights, x.numpy())
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


class MovesTheBatch(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fc, self.fn = nn.Linear(4, 4), fn

    def forward(self, x):
        return self.fn(self.fc(x))


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, 3))

    def forward(self, x):
        return F.conv1d(x, self.weight)


# (id, model, input shape, strings the message must contain)
REFUSED = [
    ("conv3d", nn.Sequential(nn.Conv3d(1, 2, 2)), (1, 3, 3, 3), ["'0'", "Conv3d", "Conv1d/2d"]),
    ("lppool1d", nn.Sequential(nn.Conv1d(1, 2, 2), nn.LPPool1d(2, 2)), (1, 5), ["'1'", "LPPool1d"]),
    ("adaptive-maxpool1d", nn.Sequential(nn.Conv1d(1, 2, 2), nn.AdaptiveMaxPool1d(2)), (1, 5), ["'1'", "AdaptiveMax"]),
    ("functional-conv1d", FunctionalConv(), (2, 6), ["conv1d", "nn.Conv1d"]),
    ("transpose-batch", MovesTheBatch(lambda x: x.transpose(0, 1).reshape(-1, 4)), (2, 4), ["transpose", "batch"]),
    ("permute-batch", MovesTheBatch(lambda x: x.permute(1, 0)), (4,), ["permute", "batch"]),
    ("view-over-batch", MovesTheBatch(lambda x: x.view(-1, 2)), (4,), ["view", "batch"]),
    ("flatten-batch", MovesTheBatch(lambda x: torch.flatten(x)), (4,), ["flatten", "batch"]),
]


@pytest.mark.parametrize("case_id, model, shape, needles", REFUSED, ids=[c[0] for c in REFUSED])
def test_other_layers_are_still_refused_naming_the_layer(case_id, model, shape, needles):
    with pytest.raises(PlanError) as info:
        from_pytorch(model, shape)
    for needle in needles:
        assert needle in str(info.value), f"{case_id}: {needle!r} not in {str(info.value)!r}"


def all_the_layers() -> nn.Module:
    """Depthwise conv, adaptive average pooling, then a Conv1d over the pooled positions."""
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((3, 3)),
        nn.Flatten(2),
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 9, 5),
    ).eval()


def test_conv1d_and_depthwise_model_through_the_real_processes(cluster):
    torch.manual_seed(21)
    model = all_the_layers()
    with torch.no_grad():  # logits of a few units, so that the release's flooding noise is small beside them
        model[-1].weight.mul_(10)
        model[-1].bias.mul_(10)
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    plan = owner.plan(model, (2, 6, 6), "encrypted")
    assert [stage.placement.value for stage in plan.graph.stages] == ["he", "he", "he"]
    model_id = owner.deploy(plan, readers=[DATA_OWNER.public])
    owner.close()
    x = np.random.default_rng().normal(0, 2, (3, 2, 6, 6))
    with torch.no_grad():
        want = model.double()(torch.from_numpy(x)).numpy()
    data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    inference = data_owner.infer_batch(model_id, x)
    data_owner.close()
    got = inference.batch_logits
    spread = want.max() - want.min()
    assert got.shape == want.shape
    assert inference.noise_sd < 1e-3 * spread
    assert np.abs(got - want).max() < 1e-3 * spread + 6 * inference.noise_sd
