"""The model zoo (``examples/zoo.py``): every model runs in torch with the layout it claims, the models heclave
imports today agree with torch exactly, and the ones it refuses today are refused with a ``PlanError`` that
says why.

Every model of the zoo is covered (about 20 s in all); building and tracing cost seconds for the large ones, so
each model is built once for this module.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn

from heclave.benchmarks.commands import zoo as zoo_command
from heclave.examples.zoo import ZOO, InputKind, train_breast_cancer_mlp
from heclave.plan.importer import from_pytorch
from heclave.plan.planner import plan_model
from heclave.protocol.errors import PlanError
from tests.helpers import run_imported

CLASSES = {
    "resnet20": 10,
    "vgg16": 10,
    "mobilenetv2": 10,
    "resnet18": 1000,
    "resnet50": 1000,
    "digits-cnn": 10,
    "breast-cancer-mlp": 2,
}
# torchvision's parameter counts for its resnet18 and resnet50: the same layouts, layer for layer.
TORCHVISION_PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032}
# The models heclave imports and plans today.
IMPORTED = ("breast-cancer-mlp", "digits-cnn")
# The models refused today (all the others), with what the refusal must name: the layer, and the dense map it
# would need. Every affine run is composed as one dense matrix (plan/torch_steps.py, MAX_AFFINE_ENTRIES), so a
# convolution on a 32x32 or 224x224 image is refused; ResNet-20's stem (3072 -> 16384) still fits, its first
# block does not. Each is refused before the map is made: ResNet-20 took 22 GB and the OOM killer before that.
REFUSED = {
    "resnet20": ("stages.0.0.conv1", "16384x16384"),
    "vgg16": ("layer '0'", "65536x3072"),
    "mobilenetv2": ("layer '0'", "32768x3072"),
    "resnet18": ("stem.0", "802816x150528"),
    "resnet50": ("stem.0", "802816x150528"),
}


@functools.cache
def built(name: str) -> nn.Module:
    return ZOO[name].factory()


def test_every_zoo_model_is_covered_by_exactly_one_list_here():
    assert sorted(CLASSES) == sorted(ZOO)
    assert sorted([*IMPORTED, *REFUSED]) == sorted(ZOO)


def test_the_bench_command_names_every_zoo_model():
    (option,) = [p for p in zoo_command.params if p.name == "models"]
    named = option.help.rsplit(": ", 1)[1].strip(" .").split(", ")
    assert named == list(ZOO)


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_runs_on_the_input_shape(name):
    entry, model = ZOO[name], built(name)
    assert not model.training
    x = torch.from_numpy(entry.random_inputs(2, seed=1)).float()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, CLASSES[name])
    assert torch.isfinite(y).all() and float(y.std()) > 0
    if name in TORCHVISION_PARAMETERS:
        assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[name]


@pytest.mark.parametrize("name", [n for n in ZOO if not ZOO[n].trained])
def test_random_models_have_nontrivial_batch_norm_statistics(name):
    norms = [m for m in built(name).modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for norm in norms:
        assert norm.running_mean.abs().max() > 0 and (norm.running_var - 1).abs().max() > 0
        assert (norm.weight - 1).abs().max() > 0 and norm.bias.abs().max() > 0


def test_factories_are_deterministic():
    again = ZOO["resnet20"].factory()
    for (key, a), b in zip(built("resnet20").state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_the_breast_cancer_mlp_learned_its_task():
    model, x_test, y_test = train_breast_cancer_mlp()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    assert accuracy >= 0.9
    assert ZOO["breast-cancer-mlp"].inputs is InputKind.FEATURES


@pytest.mark.parametrize("name", IMPORTED)
def test_imported_models_agree_with_torch(name):
    entry, model = ZOO[name], built(name)
    imported = from_pytorch(model, entry.input_shape)
    plan_model(imported)  # and it plans
    x = entry.random_inputs(1, seed=2)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(torch.from_numpy(x)).numpy()[0]
    got = run_imported(imported, x[0])
    assert np.abs(got - expected).max() <= 1e-8 * np.abs(expected).max()


@pytest.mark.parametrize("name", REFUSED)
def test_refused_models_are_refused_with_a_reason(name):
    layer, size = REFUSED[name]
    with pytest.raises(PlanError) as refused:
        from_pytorch(built(name), ZOO[name].input_shape)
    assert layer in refused.value.message and size in refused.value.message
    assert "too large to compose exactly" in refused.value.message
