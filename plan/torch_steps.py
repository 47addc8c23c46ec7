"""One torch operation at a time: what it is (affine, an exact step, or refused), and how a run of affine
operations composes into one exact map.

Linear, Conv1d/2d (any stride, padding, dilation and groups), average pooling
(also adaptive), BatchNorm, padding, interpolation, reshapes, permutations,
Dropout and Identity are affine in evaluation mode (``AFFINE_NAMES``), so a run
of them is composed into one map ``y = W x + b`` over the flattened
activations, computed exactly in float64 by applying the run to the standard
basis. That is how batch-norm gets folded into the preceding linear layer, and
average pooling into its neighbours: no special cases, nothing approximated.
The common nonlinearities become exact enclave steps (``plan.activation_import``),
each checked against the layer itself on a random input. Anything else is
refused with a message naming the layer.
"""

from __future__ import annotations

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

from .activation_import import NONLINEAR_NAMES, enclave_op, is_nonlinear

# Affine in evaluation mode, with no parameter but the module's own (so the structural support can
# randomise them): convolutions (any stride, padding, padding mode, dilation and groups), average
# pooling, batch-norm, padding of every mode (a nonzero constant is a bias), interpolation of every
# mode (each output is a fixed combination of inputs) and reshapes and permutations.
AFFINE_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.Upsample,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Identity,
)
AFFINE_NAMES = (
    "Linear, Conv1d/2d (any stride, padding, dilation and groups), AvgPool1d/2d, AdaptiveAvgPool1d/2d, "
    "BatchNorm1d/2d, padding (Zero/Constant/Reflection/Replication/CircularPad1d/2d, F.pad), Upsample "
    "(F.interpolate), Flatten, Unflatten, view, reshape, permute, transpose, contiguous, Dropout and Identity"
)
# Functional forms without weights only: F.conv2d(x, self.weight) would keep the weight out of the
# structural support, which must not depend on trained values; such layers are imported as modules.
AFFINE_FUNCTIONS = {
    torch.flatten,
    torch.unflatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    F.dropout,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.pad,
    F.interpolate,
}
AFFINE_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous"}
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
class Step:
    node: fx.Node
    kind: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    name: str
    module: nn.Module | None = None
    affine_part: nn.Module | None = None  # a LayerNorm's weight and bias, applied by the next step


def describe(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"layer '{node.target}' ({type(module).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"operation '{node.name}' ({node.op} {target})"


def classify(node: fx.Node, gm: fx.GraphModule) -> tuple[str, nn.Module | None]:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, AFFINE_MODULES):
            return "affine", module
        if is_nonlinear(node, module):
            return "nonlinear", module
        raise PlanError(
            f"{describe(node, module)} is not supported. heclave imports {AFFINE_NAMES} (affine) and "
            f"{NONLINEAR_NAMES} (exact, in the enclave)."
        )
    if node.op == "call_function" and node.target in AFFINE_FUNCTIONS:
        return "affine", None
    if node.op == "call_method" and node.target in AFFINE_METHODS:
        return "affine", None
    if is_nonlinear(node):
        return "nonlinear", None
    if node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.batch_norm):
        raise PlanError(
            f"{describe(node, None)} is not supported in its functional form: use the module "
            "(nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d/2d), whose weights heclave can see."
        )
    raise PlanError(f"{describe(node, None)} is not supported; express it with supported torch layers.")


def is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in SHAPE_METHODS) or (
        node.op == "call_function" and node.target in (getattr, operator.getitem)
    )


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise PlanError(
            f"The model cannot be traced by torch.fx ({type(exc).__name__}): heclave needs a forward pass "
            "without data-dependent control flow."
        ) from None


def applier(node: fx.Node, gm: fx.GraphModule, prev: fx.Node, shapes: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function computing ``node`` from its chain input, resolving shape queries on the fly."""

    def resolve(arg: Any, x: torch.Tensor) -> Any:
        if isinstance(arg, fx.Node):
            if arg is prev:
                return x
            if arg.op == "get_attr":
                return operator.attrgetter(str(arg.target))(gm)
            if is_shape_query(arg):
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


def _apply_run(run: list[Step], in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The run's exact matrix and offset, from its outputs on zero and on the standard basis."""
    n = int(np.prod(in_shape))
    for step in run:  # refused before the basis is made: a too-large run would exhaust memory, not fail
        meta = step.node.meta.get("tensor_meta")
        size = int(np.prod(meta.shape[1:])) if hasattr(meta, "shape") else 0
        if size * n > MAX_AFFINE_ENTRIES:
            raise PlanError(f"{step.name}: an affine map of {size}x{n} is too large to compose exactly.")
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
        if y0.dim() == 0 or (y0.shape[0], yb.shape[0], y0.shape[1:]) != (1, n, yb.shape[1:]):
            # A batch of 1 and a batch of n inputs must give 1 and n outputs of one shape; an operation
            # that moves the batch axis (x.transpose(0, 1), x.view(-1, k)) would mix the inputs.
            raise PlanError(
                f"{step.name} moves or reshapes the batch axis (axis 0); heclave imports layers that act on "
                "each input separately."
            )
        if yb[0].numel() * n > MAX_AFFINE_ENTRIES:
            raise PlanError(f"{step.name}: an affine map of {yb[0].numel()}x{n} is too large to compose exactly.")
    weight = (yb.reshape(n, -1) - y0.reshape(1, -1)).numpy().T.copy()
    return weight, y0.reshape(-1).numpy().copy(), tuple(y0.shape[1:])


def _structural_support(run: list[Step], in_shape: tuple[int, ...]) -> np.ndarray:
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


def compose(run: list[Step], in_shape: tuple[int, ...]) -> AffineMap:
    weight, bias, out_shape = _apply_run(run, in_shape)
    support = _structural_support(run, in_shape)
    return AffineMap(weight, bias, in_shape, out_shape, support, [s.name for s in run])


def checked_op(step: Step, in_shape: tuple[int, ...]) -> EnclaveOp:
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
