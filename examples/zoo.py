"""A model zoo: standard architectures built from plain torch layers, for ``heclave bench zoo`` and the tests.

Every entry of :data:`ZOO` names a factory that returns the model in evaluation
mode, the shape of one input (no batch axis), a one-line description, and
whether its weights are trained or random. The factories are deterministic
(fixed seeds), so two calls give the same weights.

- ``resnet20``: the CIFAR ResNet of He et al. (2016), 3 stages of 3 basic
  blocks with 16/32/64 channels; where the shape changes the shortcut is a
  strided 1x1 convolution and batch-norm (their option B).
- ``vgg16``: VGG-16's thirteen 3x3 convolutions (64 to 512 channels, with
  batch-norm as CIFAR variants have it) and five max-pools, then
  ``Linear(512, 512)``, ReLU, ``Linear(512, 10)``.
- ``mobilenetv2``: MobileNetV2 (Sandler et al., 2018) at width 1.0 with ReLU6
  and depthwise convolutions; for 32x32 inputs the stem and the second stage
  have stride 1 (the usual CIFAR strides), leaving 4x4 before the pooling.
- ``resnet18`` and ``resnet50``: the ImageNet layouts (torchvision's: 7x7 stem,
  max-pool, basic or bottleneck blocks with the stride on the 3x3 convolution,
  1000 classes).
- ``digits-cnn``: the demo's CNN, trained on scikit-learn's 8x8 digits
  (:mod:`heclave.workloads`).
- ``breast-cancer-mlp``: 30 -> 16 -> 2, trained on scikit-learn's breast-cancer
  data set with standardized features.

The untrained models' batch-norm layers get running statistics measured on
random inputs (one forward pass in training mode) and random scales and
shifts, all from a fixed seed: their evaluation-mode output is then neither
the identity nor a blow-up, so comparing an import with torch means something.
Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from heclave.workloads import INPUT_SHAPE as DIGITS_SHAPE
from heclave.workloads import Split, single_threaded, train_digits_cnn

__all__ = [
    "ZOO",
    "InputKind",
    "ZooModel",
    "breast_cancer_mlp",
    "breast_cancer_split",
    "mobilenetv2",
    "resnet18",
    "resnet20",
    "resnet50",
    "train_breast_cancer_mlp",
    "vgg16",
]

CIFAR_SHAPE = (3, 32, 32)
IMAGENET_SHAPE = (3, 224, 224)
BREAST_CANCER_SHAPE = (30,)
SEED = 0


class InputKind(str, Enum):
    """What one input of a zoo model looks like, for drawing random ones."""

    IMAGE = "image"  # pixels in [0, 1]
    FEATURES = "features"  # standardized features: mean 0, variance 1


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: how to build it and what it takes."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str
    trained: bool
    inputs: InputKind = InputKind.IMAGE

    def random_inputs(self, n: int, seed: int = SEED) -> np.ndarray:
        """``n`` float64 inputs of :attr:`input_shape` drawn like the model's real ones (see :class:`InputKind`)."""
        rng = np.random.default_rng(seed)
        shape = (n, *self.input_shape)
        return rng.standard_normal(shape) if self.inputs is InputKind.FEATURES else rng.uniform(0.0, 1.0, shape)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch-norm, plus the input (or its strided 1x1 projection), then ReLU."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, planes, 3, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.out(self.bn2(self.conv2(y)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 down to ``planes``, 3x3 (strided), 1x1 up to ``4 * planes``, each with batch-norm; shortcut; ReLU."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, planes * 4, 1), nn.BatchNorm2d(planes * 4)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = _shortcut(c_in, planes * 4, stride)
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        return self.out(self.bn3(self.conv3(y)) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """The identity where the shape stays; a strided 1x1 convolution and batch-norm where it changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """A stem, stages of residual blocks (the first of each stage but the first strided), global average pooling
    and a linear classifier."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: Sequence[int],
        widths: Sequence[int],
        stem: nn.Module,
        stem_width: int,
        classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        stages, c_in = [], stem_width
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c_in, planes, 2 if i > 0 and j == 0 else 1))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


def _imagenet_resnet(block: type[BasicBlock | Bottleneck], depths: Sequence[int]) -> ResNet:
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1)
    )
    return ResNet(block, depths, (64, 128, 256, 512), stem, 64, classes=1000)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise (strided), ReLU6 after both, linear 1x1 projection;
    the input is added back where stride and width stay."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [_conv(c_in, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [_conv(hidden, hidden, 3, stride, groups=hidden), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [_conv(hidden, c_out, 1), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# MobileNetV2's stages (expansion, width, blocks, stride); the second stage's stride is 1 for 32x32 inputs.
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2))
MOBILENETV2_STAGES += ((6, 320, 1, 1),)
VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _with_statistics(model: nn.Module, input_shape: tuple[int, ...], seed: int, images: int = 8) -> nn.Module:
    """Give every batch-norm random scales and shifts, and running statistics measured on random inputs."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: after one pass, exactly that pass's statistics
        model.train()
        model(torch.rand((images, *input_shape), generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def resnet20(seed: int = SEED) -> nn.Module:
    """The CIFAR ResNet-20 (He et al.): 3x3 stem to 16 channels, 3 stages of 3 basic blocks (16/32/64), option-B
    shortcuts, global average pooling, ``Linear(64, 10)``; random weights."""
    torch.manual_seed(seed)
    stem = nn.Sequential(_conv(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
    return _with_statistics(ResNet(BasicBlock, (3, 3, 3), (16, 32, 64), stem, 16, classes=10), CIFAR_SHAPE, seed)


def vgg16(seed: int = SEED) -> nn.Module:
    """VGG-16 for 32x32 inputs: 13 conv-batch-norm-ReLU layers and 5 max-pools, then 512 -> 512 -> 10."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c_in = 3
    for width in VGG16_WIDTHS:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, int(width), 3, padding=1), nn.BatchNorm2d(int(width)), nn.ReLU()]
            c_in = int(width)
    layers += [nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)]
    return _with_statistics(nn.Sequential(*layers), CIFAR_SHAPE, seed)


def mobilenetv2(seed: int = SEED) -> nn.Module:
    """MobileNetV2 (width 1.0) for 32x32 inputs: stride-1 stem to 32 channels, 17 inverted residual blocks,
    1x1 to 1280, global average pooling, ``Linear(1280, 10)``; random weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [_conv(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU6()]
    c_in = 32
    for expansion, width, blocks, stride in MOBILENETV2_STAGES:
        for j in range(blocks):
            layers.append(InvertedResidual(c_in, width, stride if j == 0 else 1, expansion))
            c_in = width
    layers += [_conv(c_in, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 10)]
    return _with_statistics(nn.Sequential(*layers), CIFAR_SHAPE, seed)


def resnet18(seed: int = SEED) -> nn.Module:
    """ResNet-18 for 224x224 ImageNet inputs (basic blocks, 2-2-2-2); random weights."""
    torch.manual_seed(seed)
    return _with_statistics(_imagenet_resnet(BasicBlock, (2, 2, 2, 2)), IMAGENET_SHAPE, seed, images=4)


def resnet50(seed: int = SEED) -> nn.Module:
    """ResNet-50 for 224x224 ImageNet inputs (bottleneck blocks, 3-4-6-3); random weights."""
    torch.manual_seed(seed)
    return _with_statistics(_imagenet_resnet(Bottleneck, (3, 4, 6, 3)), IMAGENET_SHAPE, seed, images=4)


def breast_cancer_split(seed: int = SEED) -> Split:
    """scikit-learn's breast-cancer data: train and held-out features, standardized with the training split's
    means and deviations (float32, shape (N, 30)), and their labels."""
    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target
    )
    scaler = StandardScaler().fit(x_train)
    return (
        scaler.transform(x_train).astype(np.float32),
        scaler.transform(x_test).astype(np.float32),
        y_train,
        y_test,
    )


def breast_cancer_mlp() -> nn.Sequential:
    """30 standardized features -> 16 -> ReLU -> 2 logits (malignant, benign)."""
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def train_breast_cancer_mlp(steps: int = 300, seed: int = SEED) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """Train the MLP with Adam on the whole training split for ``steps`` steps (under a second on CPU); returns
    the model and the held-out features and labels."""
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = breast_cancer_split(seed)
    model = breast_cancer_mlp()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    with single_threaded():
        model.train()
        for _ in range(steps):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            optimiser.step()
    return model.eval(), x_test, y_test


def _trained_digits_cnn() -> nn.Module:
    """The demo's digits CNN, trained as :func:`heclave.workloads.train_digits_cnn` trains it."""
    return train_digits_cnn()[0]


ZOO: dict[str, ZooModel] = {
    entry.name: entry
    for entry in (
        ZooModel(
            "resnet20",
            resnet20,
            CIFAR_SHAPE,
            "CIFAR ResNet-20 (He et al.): 3x3 basic blocks, 16/32/64 channels, 1x1-conv shortcuts, 10 classes",
            trained=False,
        ),
        ZooModel(
            "vgg16",
            vgg16,
            CIFAR_SHAPE,
            "VGG-16 with batch-norm for CIFAR: 13 convs (64-512), 5 max-pools, 512-512-10 classifier",
            trained=False,
        ),
        ZooModel(
            "mobilenetv2",
            mobilenetv2,
            CIFAR_SHAPE,
            "MobileNetV2 width 1.0, CIFAR strides: inverted residuals, depthwise 3x3, ReLU6, 10 classes",
            trained=False,
        ),
        ZooModel(
            "resnet18",
            resnet18,
            IMAGENET_SHAPE,
            "ResNet-18, ImageNet layout: 7x7 stem, max-pool, basic blocks 2-2-2-2, 1000 classes",
            trained=False,
        ),
        ZooModel(
            "resnet50",
            resnet50,
            IMAGENET_SHAPE,
            "ResNet-50, ImageNet layout: 7x7 stem, max-pool, bottleneck blocks 3-4-6-3, 1000 classes",
            trained=False,
        ),
        ZooModel(
            "digits-cnn",
            _trained_digits_cnn,
            DIGITS_SHAPE,
            "the demo's CNN on scikit-learn's 8x8 digits: conv, batch-norm, ReLU, max-pool, 128-32-10",
            trained=True,
        ),
        ZooModel(
            "breast-cancer-mlp",
            lambda: train_breast_cancer_mlp()[0],
            BREAST_CANCER_SHAPE,
            "MLP 30-16-2 on scikit-learn's breast-cancer data (standardized features)",
            trained=True,
            inputs=InputKind.FEATURES,
        ),
    )
}
"""Every zoo model by name."""
