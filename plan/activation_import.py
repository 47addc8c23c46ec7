"""Torch's nonlinearities as exact enclave steps: which layers, functions and methods are steps, and the
:class:`~heclave.graph.ops.EnclaveOp` each becomes.

This module knows one ``torch.fx`` node at a time, so the chain importer
(``plan.importer``) and any later graph importer share it: given a node and the
shape of the activation it consumes (batch axis excluded), :func:`enclave_op`
returns the step or a :class:`PlanError` that names the layer. A step's
hyperparameters (slope, axis, eps, window) must be constants of the model; they
are public. LayerNorm's weight and bias are model weights and never enter the
step: :func:`elementwise_affine` hands them back as an affine module, which the
importer folds into the next affine run.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from heclave.graph.ops import BINARY, GELU_FORMS, EnclaveOp, OpKind
from heclave.protocol.errors import PlanError

K = OpKind
MODULES: dict[type[nn.Module], tuple[OpKind, tuple[str, ...]]] = {
    nn.ReLU: (K.RELU, ()),
    nn.ReLU6: (K.RELU6, ()),
    nn.LeakyReLU: (K.LEAKY_RELU, ("negative_slope",)),
    nn.ELU: (K.ELU, ("alpha",)),
    nn.Sigmoid: (K.SIGMOID, ()),
    nn.Tanh: (K.TANH, ()),
    nn.GELU: (K.GELU, ("approximate",)),
    nn.SiLU: (K.SILU, ()),
    nn.Hardswish: (K.HARDSWISH, ()),
    nn.Hardsigmoid: (K.HARDSIGMOID, ()),
    nn.Softmax: (K.SOFTMAX, ("dim",)),
    nn.LogSoftmax: (K.LOG_SOFTMAX, ("dim",)),
    nn.LayerNorm: (K.LAYER_NORM, ("normalized_shape", "eps")),
    nn.MaxPool2d: (K.MAXPOOL2D, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    nn.AdaptiveMaxPool2d: (K.ADAPTIVE_MAXPOOL2D, ("output_size", "return_indices")),
}
NONLINEAR_MODULES = tuple(MODULES)
NONLINEAR_NAMES = ", ".join(m.__name__ for m in NONLINEAR_MODULES)


# Torch's signatures, spelled out: several of these are builtins that inspect cannot read.
def _plain(input, inplace=False): ...
def _leaky(input, negative_slope=0.01, inplace=False): ...
def _elu(input, alpha=1.0, inplace=False): ...
def _gelu(input, approximate="none"): ...
def _f_softmax(input, dim=None, _stacklevel=3, dtype=None): ...
def _softmax(input, dim, dtype=None): ...
def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _max_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...
def _adaptive_max_pool(input, output_size, return_indices=False): ...


FUNCTIONS: dict[Any, tuple[OpKind, Callable]] = {
    torch.relu: (K.RELU, _plain),
    F.relu: (K.RELU, _plain),
    F.relu6: (K.RELU6, _plain),
    F.leaky_relu: (K.LEAKY_RELU, _leaky),
    F.elu: (K.ELU, _elu),
    torch.sigmoid: (K.SIGMOID, _plain),
    F.sigmoid: (K.SIGMOID, _plain),
    torch.tanh: (K.TANH, _plain),
    F.tanh: (K.TANH, _plain),
    F.gelu: (K.GELU, _gelu),
    F.silu: (K.SILU, _plain),
    F.hardswish: (K.HARDSWISH, _plain),
    F.hardsigmoid: (K.HARDSIGMOID, _plain),
    F.softmax: (K.SOFTMAX, _f_softmax),
    torch.softmax: (K.SOFTMAX, _softmax),
    F.log_softmax: (K.LOG_SOFTMAX, _f_softmax),
    torch.log_softmax: (K.LOG_SOFTMAX, _softmax),
    F.layer_norm: (K.LAYER_NORM, _layer_norm),
    F.max_pool2d: (K.MAXPOOL2D, _max_pool),
    torch.max_pool2d: (K.MAXPOOL2D, _max_pool),
    F.adaptive_max_pool2d: (K.ADAPTIVE_MAXPOOL2D, _adaptive_max_pool),
}
METHODS: dict[str, tuple[OpKind, Callable]] = {
    "relu": (K.RELU, _plain),
    "relu_": (K.RELU, _plain),
    "sigmoid": (K.SIGMOID, _plain),
    "sigmoid_": (K.SIGMOID, _plain),
    "tanh": (K.TANH, _plain),
    "tanh_": (K.TANH, _plain),
    "softmax": (K.SOFTMAX, _softmax),
    "log_softmax": (K.LOG_SOFTMAX, _softmax),
}


def _lookup(node: fx.Node, module: nn.Module | None) -> tuple[OpKind, Callable | tuple[str, ...]] | None:
    """The step's kind and how to read its hyperparameters: a module's attribute names, or torch's signature."""
    if node.op == "call_module":
        return next((found for t, found in MODULES.items() if isinstance(module, t)), None)
    table = FUNCTIONS if node.op == "call_function" else METHODS if node.op == "call_method" else {}
    try:
        return table.get(node.target)
    except TypeError:  # an unhashable target is no step of ours
        return None


def is_nonlinear(node: fx.Node, module: nn.Module | None = None) -> bool:
    """Whether ``node`` (with its module, for ``call_module``) is a nonlinearity the enclave computes exactly."""
    return _lookup(node, module) is not None


def _arguments(node: fx.Node, module: nn.Module | None, name: str) -> tuple[OpKind, dict[str, Any]]:
    """The step's kind and its hyperparameters, by torch's names."""
    kind, reader = _lookup(node, module)
    if isinstance(reader, tuple):
        return kind, {p: getattr(module, p) for p in reader}
    try:
        bound = inspect.signature(reader).bind(*node.args, **node.kwargs)
    except TypeError as exc:
        raise PlanError(f"{name} is called with arguments heclave cannot read ({exc}).") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.pop("input")
    for key, value in values.items():
        if key not in ("weight", "bias") and _has_node(value):
            raise PlanError(f"{name}: its {key} is computed in the forward pass; heclave needs it as a constant.")
    return kind, values


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    return isinstance(value, (list, tuple)) and any(_has_node(v) for v in value)


def _sizes(value: Any) -> tuple:
    """An int or a sequence of them as a tuple (anything else as an empty tuple, which every check refuses)."""
    if isinstance(value, int):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        return ()


def _pair(value: Any, what: str, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else _sizes(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise PlanError(f"{name}: its {what} {value!r} is not one or two integers.")
    return pair


def _axis(dim: Any, shape: tuple[int, ...], name: str) -> int:
    """Torch's ``dim`` of the batched tensor, as an axis of ``shape`` (which has no batch axis)."""
    if dim is None and len(shape) == 1:
        return 0  # torch's implicit choice for a batch of vectors
    if dim is None or isinstance(dim, bool) or not isinstance(dim, int):
        raise PlanError(f"{name} needs an explicit integer dim, got {dim!r}.")
    rank = len(shape) + 1
    if not -rank <= dim < rank:
        raise PlanError(f"{name}: dim {dim} is outside its input of shape (batch, {', '.join(map(str, shape))}).")
    if dim % rank == 0:
        raise PlanError(f"{name} normalises over the batch axis (dim {dim}); each query must stand alone.")
    return dim % rank - 1


def _pool(kind: OpKind, p: dict[str, Any], shape: tuple[int, ...], name: str) -> dict[str, Any]:
    if p["return_indices"]:
        raise PlanError(f"{name}: return_indices is not supported; the enclave returns the pooled values only.")
    if len(shape) != 3:
        raise PlanError(f"{name} needs a (channels, height, width) input, got shape {shape}.")
    if kind is K.ADAPTIVE_MAXPOOL2D:
        size = (p["output_size"],) * 2 if p["output_size"] is None else p["output_size"]
        size = (size, size) if isinstance(size, int) else _sizes(size)
        if len(size) != 2:
            raise PlanError(f"{name}: output_size {p['output_size']!r} is not one or two sizes.")
        filled = tuple(n if o is None else o for o, n in zip(size, shape[1:]))
        return {"output_size": _pair(filled, "output_size", name)}
    kernel = _pair(p["kernel_size"], "kernel_size", name)
    stride = kernel if p["stride"] is None or (isinstance(p["stride"], (list, tuple)) and not p["stride"]) else None
    return {
        "kernel": kernel,
        "stride": stride or _pair(p["stride"], "stride", name),
        "padding": _pair(p["padding"], "padding", name),
        "dilation": _pair(p["dilation"], "dilation", name),
        "ceil_mode": bool(p["ceil_mode"]),
    }


def _hyperparameters(kind: OpKind, p: dict[str, Any], shape: tuple[int, ...], name: str) -> dict[str, Any]:
    if kind is K.LEAKY_RELU:
        return {"slope": p["negative_slope"]}
    if kind is K.ELU:
        return {"alpha": p["alpha"]}
    if kind is K.GELU:
        if p["approximate"] not in GELU_FORMS:
            raise PlanError(f"{name}: GELU approximate={p['approximate']!r} is not one of {GELU_FORMS}.")
        return {"approximate": p["approximate"]}
    if kind in (K.SOFTMAX, K.LOG_SOFTMAX):
        if p.get("dtype") not in (None, torch.float32, torch.float64):
            raise PlanError(f"{name}: dtype {p['dtype']} is not supported; the enclave computes in float64.")
        return {"dim": _axis(p["dim"], shape, name)}
    if kind is K.LAYER_NORM:
        normalized = _sizes(p["normalized_shape"])
        if not normalized or len(normalized) > len(shape) or normalized != shape[len(shape) - len(normalized) :]:
            raise PlanError(f"{name} normalises over {normalized}, which is not the end of its input shape {shape}.")
        return {"axes": len(normalized), "eps": p["eps"]}
    if kind in (K.MAXPOOL2D, K.ADAPTIVE_MAXPOOL2D):
        return _pool(kind, p, shape, name)
    return {}


def enclave_op(node: fx.Node, module: nn.Module | None, in_shape: tuple[int, ...], name: str) -> EnclaveOp:
    """The exact enclave step computing ``node`` on an activation of ``in_shape``; PlanError naming ``name``."""
    if not is_nonlinear(node, module):
        raise PlanError(f"{name} is not a nonlinearity heclave computes in the enclave.")
    kind, params = _arguments(node, module, name)
    shape = tuple(int(d) for d in in_shape)
    values = _hyperparameters(kind, params, shape, name)
    try:
        return EnclaveOp(kind, shape, **values)
    except PlanError as exc:
        raise PlanError(f"{name}: {exc}") from None


class ElementwiseAffine(nn.Module):
    """LayerNorm's ``x * weight + bias`` over the trailing axes: model weights, so an affine step, not the
    enclave's. The tensors are the model's own (registered again here), so the importer's structural pass
    replaces them like any layer's parameters."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        for key, tensor in (("weight", weight), ("bias", bias)):
            if isinstance(tensor, nn.Parameter) or tensor is None:
                self.register_parameter(key, tensor)
            else:
                self.register_buffer(key, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x = x * self.weight
        return x if self.bias is None else x + self.bias


def elementwise_affine(node: fx.Node, module: nn.Module | None, gm: fx.GraphModule) -> ElementwiseAffine | None:
    """The weights a LayerNorm step leaves to the next affine run, or None (not a LayerNorm, or no weights)."""
    if not is_nonlinear(node, module) or _lookup(node, module)[0] is not K.LAYER_NORM:
        return None
    if module is not None:
        weight, bias = module.weight, module.bias
    else:
        _, params = _arguments(node, None, node.name)
        fetch = lambda v: operator.attrgetter(str(v.target))(gm) if isinstance(v, fx.Node) else v  # noqa: E731
        weight, bias = fetch(params["weight"]), fetch(params["bias"])
    if weight is None and bias is None:
        return None
    return ElementwiseAffine(weight, bias)


_TORCH: dict[OpKind, Callable[[torch.Tensor, EnclaveOp], torch.Tensor]] = {
    K.RELU: lambda x, op: torch.relu(x),
    K.RELU6: lambda x, op: F.relu6(x),
    K.LEAKY_RELU: lambda x, op: F.leaky_relu(x, op.slope),
    K.ELU: lambda x, op: F.elu(x, op.alpha),
    K.SIGMOID: lambda x, op: torch.sigmoid(x),
    K.TANH: lambda x, op: torch.tanh(x),
    K.GELU: lambda x, op: F.gelu(x, approximate=op.approximate),
    K.SILU: lambda x, op: F.silu(x),
    K.HARDSWISH: lambda x, op: F.hardswish(x),
    K.HARDSIGMOID: lambda x, op: F.hardsigmoid(x),
    K.SOFTMAX: lambda x, op: torch.softmax(x, op.dim + 1),
    K.LOG_SOFTMAX: lambda x, op: torch.log_softmax(x, op.dim + 1),
    K.LAYER_NORM: lambda x, op: F.layer_norm(x, op.in_shape[len(op.in_shape) - op.axes :], eps=op.eps),
    K.MAXPOOL2D: lambda x, op: F.max_pool2d(x, op.kernel, op.stride, op.padding, op.dilation, op.ceil_mode),
    K.ADAPTIVE_MAXPOOL2D: lambda x, op: F.adaptive_max_pool2d(x, op.output_size),
}


def torch_step(op: EnclaveOp, values: dict[int, torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``op`` as a differentiable torch function on a batch of flattened activations (for the assessment's
    attacks, which differentiate through the server's view); add, mul and concat take the earlier value
    they name from ``values``."""
    if op.kind in BINARY:
        return lambda h: _torch_combine(h, op, values[op.operand])
    apply = _TORCH[op.kind]
    return lambda h: apply(h.reshape(len(h), *op.in_shape), op).reshape(len(h), -1)


def _torch_combine(h: torch.Tensor, op: EnclaveOp, operand: torch.Tensor) -> torch.Tensor:
    x, other = h.reshape(len(h), *op.in_shape), operand.reshape(len(h), *op.operand_shape)
    if op.kind is OpKind.ADD:
        joined = x + other
    elif op.kind is OpKind.MUL:
        joined = x * other
    else:
        joined = torch.cat([other, x] if op.before else [x, other], dim=op.dim + 1)
    return joined.reshape(len(h), -1)
