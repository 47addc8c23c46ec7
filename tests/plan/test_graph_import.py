"""Models that are graphs, not chains: residual additions, gating products, concatenations, unused branches.

Each imported model is evaluated in plain numpy (``run_imported``) and under
CKKS layer by layer (``run_encrypted``) and compared with torch on fresh random
inputs; the structure of the stages is checked where it is the point (a skip
connection must be an enclave step, not a server stage).
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
import torch.nn as nn

from heclave.graph.model import ModelGraph
from heclave.graph.ops import OpKind
from heclave.plan.importer import from_pytorch
from heclave.plan.planner import plan_model
from heclave.protocol.errors import PlanError
from tests.helpers import run_encrypted, run_imported


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class ResidualAfterRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.fc1(x))
        return self.head(torch.relu(self.fc2(y) + y))


class Block(nn.Module):
    """A ResNet basic block; with ``down``, its shortcut is a strided 1x1 convolution and batch-norm."""

    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        stride = 2 if down else 1
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        shortcut = [nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)] if down else []
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return torch.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer1, self.layer2 = Block(4, 4, False), Block(4, 8, True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return self.head(torch.flatten(x * gate, 1))


class Concatenation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 3), nn.Linear(5, 4), nn.Linear(7, 2)

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(self.a(x)), torch.relu(self.b(x))], dim=1))


class UnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc1(x)
        self.act(y)
        return self.fc2(y)


def _batch_norms_with_statistics(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


MODELS = [
    ("residual", Residual, (4,)),
    ("residual-after-relu", ResidualAfterRelu, (4,)),
    ("tiny-resnet", lambda: _batch_norms_with_statistics(TinyResNet()), (1, 6, 6)),
    ("squeeze-excite", SqueezeExcite, (1, 4, 4)),
    ("concatenation", Concatenation, (5,)),
    ("unused-branch", UnusedBranch, (4,)),
]


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.double()(torch.from_numpy(x)[None]).numpy().reshape(-1)


@pytest.mark.parametrize("case_id, factory, shape", MODELS, ids=[m[0] for m in MODELS])
def test_a_graph_model_imports_and_agrees_with_torch(case_id, factory, shape):
    model = factory().eval()
    imported = from_pytorch(model, shape)
    for _ in range(3):
        x = np.random.default_rng().normal(size=shape)
        assert np.abs(run_imported(imported, x) - _torch(model, x)).max() < 1e-10


@pytest.mark.parametrize("case_id, factory, shape", MODELS[:4], ids=[m[0] for m in MODELS[:4]])
def test_a_graph_model_agrees_with_torch_under_ckks(keys, case_id, factory, shape):
    model = factory().eval()
    plan = plan_model(from_pytorch(model, shape), weight_form="plain")
    x = np.random.default_rng().normal(size=shape)
    want = _torch(model, x)
    got = run_encrypted(keys, plan.graph, plan.weights, x)
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.ptp(want))


def test_a_residual_block_costs_the_server_no_stage_for_its_identity_shortcut():
    imported = from_pytorch(_batch_norms_with_statistics(TinyResNet()), (1, 6, 6))
    # stem; layer1: conv1, conv2 (+ add); layer2: conv1, shortcut, conv2 (+ add); fc with the pooling
    assert len(imported.stages) == 7
    adds = [(i, op.operand) for i, (_, ops) in enumerate(imported.stages) for op in ops if op.kind is OpKind.ADD]
    assert adds == [(2, 1), (5, 5)]
    assert imported.sources == [0, 1, 2, 3, 3, 4, 6]


def test_a_gate_and_a_concatenation_are_enclave_steps():
    gate = from_pytorch(SqueezeExcite(), (1, 4, 4))
    assert [op.kind for op in gate.stages[2][1]] == [OpKind.SIGMOID, OpKind.MUL]
    joined = from_pytorch(Concatenation(), (5,))
    assert OpKind.CONCAT in {op.kind for _, ops in joined.stages for op in ops}


def _wire(graph: ModelGraph) -> dict:
    return msgpack.unpackb(graph.to_bytes(), raw=False)


def _refused(wire: dict) -> str:
    with pytest.raises(PlanError) as info:
        ModelGraph.from_bytes(msgpack.packb(wire, use_bin_type=True))
    return str(info.value)


def test_a_graph_whose_stage_reads_a_value_it_cannot_have_is_refused():
    wire = _wire(plan_model(from_pytorch(ResidualAfterRelu(), (4,))).graph)
    for source in (2, 3, 99, -1):
        wire["stages"][1]["source"] = source
        assert "reads value" in _refused(wire)
    wire["stages"][1]["source"] = True
    assert "Malformed" in _refused(wire)


def test_a_step_naming_a_later_value_or_the_wrong_shape_is_refused():
    wire = _wire(plan_model(from_pytorch(ResidualAfterRelu(), (4,))).graph)
    add = next(op for op in wire["stages"][1]["ops"] if op["kind"] == "add")
    add["operand"] = 2
    assert "cannot have" in _refused(wire)
    add["operand"], add["operand_shape"] = 1, [5]
    assert "broadcast" in _refused(wire) or "cannot have" in _refused(wire)


def test_a_plain_stage_cannot_combine_values_the_server_does_not_hold():
    with pytest.raises(PlanError, match="plain"):
        plan_model(from_pytorch(ResidualAfterRelu(), (4,)), placements=["he", "plain", "he"])
