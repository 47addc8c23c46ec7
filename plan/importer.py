"""Import a torch model as heclave's chain of exact affine maps and nonlinear steps.

The model is traced with ``torch.fx`` (a public API), and must be a chain: each
operation consumes the previous one's output. Linear, Conv2d (any stride and
padding), AvgPool2d, BatchNorm, Flatten, Dropout and Identity are affine in
evaluation mode, so every run of them is composed into one affine map
``y = W x + b`` over the flattened activations, computed exactly in float64 by
applying the run to the standard basis. That is how batch-norm gets folded into
the preceding linear layer, and average pooling into its neighbours: no special
cases, and nothing approximated. The common nonlinearities (ReLU and its
variants, sigmoid, tanh, GELU, softmax, LayerNorm, max-pooling, ...) become
exact enclave steps (``plan.activation_import``); LayerNorm's weight and bias
are an affine step that starts the next run, so they stay model weights.
Anything else is refused with a message naming the layer.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from heclave.arith.nonlinear import apply_op
from heclave.graph.ops import EnclaveOp
from heclave.protocol.errors import PlanError

from .activation_import import NONLINEAR_MODULES, NONLINEAR_NAMES, elementwise_affine, enclave_op, is_nonlinear

AFFINE_MODULES = (
    nn.Linear,
    nn.Conv2d,
    nn.AvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)
AFFINE_FUNCTIONS = {torch.flatten, F.dropout, F.avg_pool2d}
AFFINE_METHODS = {"view", "reshape", "flatten"}
SHAPE_METHODS = {"size", "dim"}
MAX_AFFINE_ENTRIES = 64_000_000


@dataclass
class AffineMap:
    """``y = weight @ x + bias`` over flattened activations, exact in float64.

    ``support`` marks the entries of ``[weight | bias]`` the architecture allows to
    be nonzero (a convolution's connectivity), whatever the trained values.
    """

    weight: np.ndarray
    bias: np.ndarray
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    support: np.ndarray
    names: list[str] = field(default_factory=list)

    @property
    def augmented(self) -> np.ndarray:
        """``[W | b]``: the weights of the layer on ``x' = [x, 1]``."""
        return np.concatenate([self.weight, self.bias[:, None]], axis=1)

    @property
    def weight_support(self) -> np.ndarray:
        """The structural nonzeros of ``W`` alone: what an ``he`` layout covers (the enclave adds the bias)."""
        return self.support[:, :-1]


@dataclass
class ImportedModel:
    """A chain of (affine map, enclave steps) stages, as imported from torch."""

    input_shape: tuple[int, ...]
    stages: list[tuple[AffineMap, list[EnclaveOp]]]


@dataclass
class _Step:
    node: fx.Node
    kind: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    name: str
    module: nn.Module | None = None
    affine_part: nn.Module | None = None  # a LayerNorm's weight and bias, applied by the next step


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"layer '{node.target}' ({type(module).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"operation '{node.name}' ({node.op} {target})"


def _classify(node: fx.Node, gm: fx.GraphModule) -> tuple[str, nn.Module | None]:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, AFFINE_MODULES):
            return "affine", module
        if is_nonlinear(node, module):
            return "nonlinear", module
        raise PlanError(
            f"{_describe(node, module)} is not supported. heclave imports Linear, Conv2d, Flatten, AvgPool2d, "
            f"BatchNorm1d/2d, Dropout and Identity (affine) and {NONLINEAR_NAMES} (exact, in the enclave)."
        )
    if node.op == "call_function" and node.target in AFFINE_FUNCTIONS:
        return "affine", None
    if node.op == "call_method" and node.target in AFFINE_METHODS:
        return "affine", None
    if is_nonlinear(node):
        return "nonlinear", None
    raise PlanError(f"{_describe(node, None)} is not supported; express it with supported torch layers.")


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in SHAPE_METHODS) or (
        node.op == "call_function" and node.target in (getattr, operator.getitem)
    )


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise PlanError(
            f"The model cannot be traced by torch.fx ({type(exc).__name__}): heclave needs a forward pass "
            "without data-dependent control flow."
        ) from None


def _chain(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> list[_Step]:
    """The model's operations in order, each applied to the previous one's output."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}
    steps: list[_Step] = []
    current: fx.Node | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise PlanError("heclave models take exactly one input tensor.")
            current = node
            shapes[node] = input_shape
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise PlanError("The model's output must be the result of its last layer.")
            break
        if _is_shape_query(node) or node.op == "get_attr":
            continue  # a parameter read (F.layer_norm's weight) belongs to the step that consumes it
        kind, module = _classify(node, gm)
        chain_inputs = [a for a in node.all_input_nodes if not _is_shape_query(a) and a.op != "get_attr"]
        if chain_inputs != [current]:
            raise PlanError(
                f"{_describe(node, module)} does not consume the previous layer's output: heclave imports "
                "sequential models (no skip connections or multiple branches)."
            )
        steps.append(_Step(node, kind, _applier(node, gm, current, shapes), _describe(node, module), module))
        affine = elementwise_affine(node, module, gm) if kind == "nonlinear" else None
        if affine is not None:  # LayerNorm: the enclave normalises, its weight and bias join the next affine run
            steps[-1].affine_part = affine
            steps.append(_Step(node, "affine", affine, f"{steps[-1].name} (weight and bias)", affine))
        current = node
    return steps


def _applier(node: fx.Node, gm: fx.GraphModule, prev: fx.Node, shapes: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function computing ``node`` from its chain input, resolving shape queries on the fly."""

    def resolve(arg: Any, x: torch.Tensor) -> Any:
        if isinstance(arg, fx.Node):
            if arg is prev:
                return x
            if arg.op == "get_attr":
                return operator.attrgetter(str(arg.target))(gm)
            if _is_shape_query(arg):
                args = [resolve(a, x) for a in arg.args]
                if arg.op == "call_method":
                    return getattr(args[0], str(arg.target))(*args[1:])
                return arg.target(*args)
            return torch.empty((x.shape[0], *shapes[arg]), dtype=x.dtype)
        if isinstance(arg, (list, tuple)):
            return type(arg)(resolve(a, x) for a in arg)
        return arg

    def apply(x: torch.Tensor) -> torch.Tensor:
        args = [resolve(a, x) for a in node.args]
        kwargs = {k: resolve(v, x) for k, v in node.kwargs.items()}
        if node.op == "call_module":
            out = gm.get_submodule(str(node.target))(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
        shapes[node] = tuple(out.shape[1:])
        return out

    return apply


def _apply_run(run: list[_Step], in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The run's exact matrix and offset, from its outputs on zero and on the standard basis."""
    n = int(np.prod(in_shape))
    y0 = torch.zeros((1, *in_shape), dtype=torch.float64)
    yb = torch.eye(n, dtype=torch.float64).reshape((n, *in_shape))
    for step in run:
        try:
            y0, yb = step.apply(y0), step.apply(yb)
        except RuntimeError as exc:
            raise PlanError(
                f"{step.name} rejects its input of shape {tuple(y0.shape[1:])} ({str(exc).splitlines()[0]}); "
                "check --input-shape and the layer sizes."
            ) from None
        if yb[0].numel() * n > MAX_AFFINE_ENTRIES:
            raise PlanError(f"{step.name}: an affine map of {yb[0].numel()}x{n} is too large to compose exactly.")
    weight = (yb.reshape(n, -1) - y0.reshape(1, -1)).numpy().T.copy()
    return weight, y0.reshape(-1).numpy().copy(), tuple(y0.shape[1:])


def _structural_support(run: list[_Step], in_shape: tuple[int, ...]) -> np.ndarray:
    """Nonzeros of ``[W | b]`` with every parameter replaced by a random positive value.

    The layout is chosen from this pattern, not from the trained weights, so the
    plan reveals the architecture's sparsity (public) but never which trained
    weights happen to be zero.
    """
    tensors = [t for s in run if s.module is not None for t in (*s.module.parameters(), *s.module.buffers())]
    saved = [t.detach().clone() for t in tensors]
    generator = torch.Generator().manual_seed(0)
    try:
        for t in tensors:
            if t.is_floating_point():
                t.data.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) + 0.5)
        weight, bias, _ = _apply_run(run, in_shape)
    finally:
        for t, value in zip(tensors, saved):
            t.data.copy_(value)
    return np.concatenate([weight != 0, bias[:, None] != 0], axis=1)


def _affine(run: list[_Step], in_shape: tuple[int, ...]) -> AffineMap:
    weight, bias, out_shape = _apply_run(run, in_shape)
    support = _structural_support(run, in_shape)
    return AffineMap(weight, bias, in_shape, out_shape, support, [s.name for s in run])


def _enclave_op(step: _Step, in_shape: tuple[int, ...]) -> EnclaveOp:
    """The step's exact enclave op, checked against the layer itself on a random input.

    A hyperparameter misread (or a layer whose forward is not what its type says)
    is refused here instead of deploying a model that computes something else.
    """
    op = enclave_op(step.node, step.module, in_shape, step.name)
    x = 3 * torch.randn((2, *in_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        expected = step.apply(x.clone())
    except RuntimeError as exc:
        raise PlanError(f"{step.name} rejects its input of shape {in_shape} ({str(exc).splitlines()[0]}).") from None
    got = torch.from_numpy(np.stack([apply_op(v, op) for v in x.numpy()]))
    if step.affine_part is not None:
        got = step.affine_part(got)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-9, atol=1e-9):
        raise PlanError(f"{step.name}: the enclave's exact step does not reproduce the layer; it is not supported.")
    return op


def from_pytorch(model: nn.Module, input_shape: tuple[int, ...]) -> ImportedModel:
    """Import ``model`` (evaluated as in ``model.eval()``) for inputs of shape ``input_shape`` (no batch axis)."""
    if not isinstance(model, nn.Module):
        raise PlanError(f"from_pytorch takes a torch.nn.Module, got {type(model).__name__}.")
    model = copy.deepcopy(model).double().eval()
    if isinstance(model, (*AFFINE_MODULES, *NONLINEAR_MODULES)):
        # fx traces through a bare leaf module's forward; as a one-layer chain it stays a layer.
        model = nn.Sequential(model)
    steps = _chain(_trace(model), tuple(input_shape))
    if not steps:
        raise PlanError("The model has no layers.")
    if steps[0].kind != "affine":
        raise PlanError(
            f"The model starts with {steps[0].name}; it must start with a linear layer (Linear, Conv2d, ...), "
            "which the server computes on the encrypted input."
        )
    stages: list[tuple[AffineMap, list[EnclaveOp]]] = []
    shape = tuple(input_shape)
    i = 0
    with torch.no_grad():
        while i < len(steps):
            run = []
            while i < len(steps) and steps[i].kind == "affine":
                run.append(steps[i])
                i += 1
            affine = _affine(run, shape)
            shape, ops = affine.out_shape, []
            while i < len(steps) and steps[i].kind != "affine":
                op = _enclave_op(steps[i], shape)
                ops.append(op)
                shape = op.out_shape
                i += 1
            stages.append((affine, ops))
    return ImportedModel(tuple(input_shape), stages)
