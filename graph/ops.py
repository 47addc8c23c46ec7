"""The nonlinear steps a stage applies after its affine layer, described as plain data.

A step is public metadata: its kind, the shape of the activation it acts on
(without the batch axis) and its hyperparameters: a slope, a softmax axis, a
pooling window. No model weight is ever part of a step: LayerNorm's
elementwise scale and shift are folded into the neighbouring affine layer by
the importer, so its step is the bare normalisation.

A graph may be handed to the enclave by a hostile server, so every step is
checked when it is made: a field of the wrong type, a kind's field on another
kind, an axis outside the shape or a window that does not fit gives a
:class:`PlanError`, never a crash or an unbounded allocation. The wire form
lists exactly the fields of the step's kind (``FIELDS``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from heclave.protocol.errors import PlanError

from .layouts.base import MAX_FEATURES

MAX_RANK = 8  # axes of an activation, batch axis excluded
MAX_POOL_PADDED = 4 * MAX_FEATURES  # entries of a padded max-pool input
MAX_POOL_WORK = 1 << 27  # comparisons of one max-pool step


class OpKind(str, Enum):
    """The nonlinear steps the enclave applies exactly (float64, no polynomial approximation)."""

    RELU = "relu"
    RELU6 = "relu6"
    LEAKY_RELU = "leaky_relu"
    ELU = "elu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    GELU = "gelu"
    SILU = "silu"
    HARDSWISH = "hardswish"
    HARDSIGMOID = "hardsigmoid"
    SOFTMAX = "softmax"
    LOG_SOFTMAX = "log_softmax"
    LAYER_NORM = "layer_norm"
    MAXPOOL2D = "maxpool2d"
    ADAPTIVE_MAXPOOL2D = "adaptive_maxpool2d"
    # Steps that combine the activation with an earlier one (``operand``, a value of the graph): a residual
    # addition, a gating product (squeeze-and-excitation) and a concatenation cost the server nothing here.
    ADD = "add"
    MUL = "mul"
    CONCAT = "concat"

    @classmethod
    def parse(cls, value: Any) -> OpKind:
        try:
            return cls(value)
        except (ValueError, TypeError):
            valid = ", ".join(k.value for k in cls)
            raise PlanError(f"Unknown enclave step {value!r:.40}; use one of: {valid}.") from None


# The hyperparameters each kind carries; every other field keeps its default and stays off the wire.
FIELDS: dict[OpKind, tuple[str, ...]] = {
    OpKind.LEAKY_RELU: ("slope",),
    OpKind.ELU: ("alpha",),
    OpKind.GELU: ("approximate",),
    OpKind.SOFTMAX: ("dim",),
    OpKind.LOG_SOFTMAX: ("dim",),
    OpKind.LAYER_NORM: ("axes", "eps"),
    OpKind.MAXPOOL2D: ("kernel", "stride", "padding", "dilation", "ceil_mode"),
    OpKind.ADAPTIVE_MAXPOOL2D: ("output_size",),
    OpKind.ADD: ("operand", "operand_shape"),
    OpKind.MUL: ("operand", "operand_shape"),
    OpKind.CONCAT: ("operand", "operand_shape", "dim", "before"),
}
BINARY = frozenset({OpKind.ADD, OpKind.MUL, OpKind.CONCAT})
GELU_FORMS = ("none", "tanh")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise PlanError(f"{what} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise PlanError(f"{what} must be an integer, got {value!r:.40}.") from None


def _ints(value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= (length or MAX_RANK):
        raise PlanError(f"{what} must be a list of {length or f'1 to {MAX_RANK}'} integers, got {value!r:.60}.")
    if length is not None and len(value) != length:
        raise PlanError(f"{what} must be a list of {length} integers, got {value!r:.60}.")
    return tuple(_int(v, what) for v in value)


def _shape(value: Any, what: str) -> tuple[int, ...]:
    """An activation's shape: 1 to ``MAX_RANK`` positive axes holding at most ``MAX_FEATURES`` values."""
    shape = _ints(value, what)
    size = 1
    for d in shape:
        if d < 1:
            raise PlanError(f"{what} has an empty axis: {shape}.")
        size *= d
        if size > MAX_FEATURES:
            raise PlanError(f"{what} {shape} exceeds {MAX_FEATURES} values.")
    return shape


def _float(value: Any, what: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise PlanError(f"{what} must be a finite number, got {value!r:.40}.")
    return number


def broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """numpy's broadcast of two shapes, or ``None`` where they do not broadcast."""
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + b
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        return None
    return tuple(max(x, y) for x, y in zip(a, b))


def pool_length(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """The length of a max-pool output along one axis, by torch's rule (0 or less: the window does not fit)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and out > 0 and (out - 1) * stride >= size + padding:
        out -= 1  # torch's rule: the last window must start inside the input or its left padding
    return out


@dataclass(frozen=True)
class EnclaveOp:
    """One nonlinear step on a decrypted activation of shape ``in_shape``.

    ``slope``: LeakyReLU's negative slope; ``alpha``: ELU's; ``approximate``:
    GELU's form (``none``, the erf form, or ``tanh``); ``dim``: the axis of
    ``in_shape`` a (log-)softmax normalises; ``axes`` and ``eps``: LayerNorm
    over the trailing ``axes`` axes; the max-pool window (``kernel`` ...
    ``ceil_mode``, as torch's MaxPool2d on ``(C, H, W)``); ``output_size`` of
    an adaptive max-pool; ``operand``, the value an add, mul or concat step
    takes besides the activation (0 the model's input, ``i + 1`` stage ``i``'s
    output), of shape ``operand_shape``; ``before``: a concat puts it first.
    """

    kind: OpKind
    in_shape: tuple[int, ...]
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False
    output_size: tuple[int, int] = (1, 1)
    operand: int = 0
    operand_shape: tuple[int, ...] = (1,)
    before: bool = False
    slope: float = 0.01
    alpha: float = 1.0
    approximate: str = "none"
    dim: int = 0
    axes: int = 1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        kind = OpKind.parse(self.kind)
        name = kind.value
        shape = _shape(self.in_shape, f"The input shape of a {name} step")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "in_shape", shape)
        for f in fields(self)[2:]:
            if f.name not in FIELDS.get(kind, ()) and getattr(self, f.name) != f.default:
                raise PlanError(f"A {name} step takes no {f.name}.")
        for f in ("kernel", "stride", "padding", "dilation", "output_size"):
            object.__setattr__(self, f, _ints(getattr(self, f), f"The {f} of a {name} step", 2))
        object.__setattr__(self, "operand_shape", _shape(self.operand_shape, f"The operand shape of a {name} step"))
        for f in ("slope", "alpha", "eps"):
            object.__setattr__(self, f, _float(getattr(self, f), f"The {f} of a {name} step"))
        for f in ("dim", "axes", "operand"):
            object.__setattr__(self, f, _int(getattr(self, f), f"The {f} of a {name} step"))
        for f in ("ceil_mode", "before"):
            if not isinstance(getattr(self, f), bool):
                raise PlanError(f"The {f} of a {name} step must be true or false, got {getattr(self, f)!r:.40}.")
        if self.approximate not in GELU_FORMS:
            raise PlanError(f"GELU's form must be one of {GELU_FORMS}, got {self.approximate!r:.40}.")
        self._check(kind, shape)

    def _check(self, kind: OpKind, shape: tuple[int, ...]) -> None:
        if kind in BINARY:
            self._check_binary(kind, shape)
        if kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX, OpKind.CONCAT) and not 0 <= self.dim < len(shape):
            raise PlanError(f"A {kind.value} step's axis {self.dim} is outside its input shape {shape}.")
        if kind is OpKind.LAYER_NORM:
            if not 1 <= self.axes <= len(shape):
                raise PlanError(f"A layer_norm step over {self.axes} trailing axes does not fit shape {shape}.")
            if self.eps < 0:
                raise PlanError(f"A layer_norm step's eps must not be negative, got {self.eps}.")
        if kind in (OpKind.MAXPOOL2D, OpKind.ADAPTIVE_MAXPOOL2D) and len(shape) != 3:
            raise PlanError(f"A {kind.value} step needs a (channels, height, width) input, got shape {shape}.")
        if kind is OpKind.MAXPOOL2D:
            self._check_pool(shape)
        if kind is OpKind.ADAPTIVE_MAXPOOL2D and not all(1 <= o <= n for o, n in zip(self.output_size, shape[1:])):
            raise PlanError(
                f"An adaptive max-pool to {self.output_size} does not fit its input {shape}: each output "
                "side must be between 1 and the input's."
            )

    def _check_binary(self, kind: OpKind, shape: tuple[int, ...]) -> None:
        if self.operand < 0:
            raise PlanError(f"A {kind.value} step's operand must be a value of the graph, got {self.operand}.")
        other = self.operand_shape
        if kind is OpKind.CONCAT:
            if len(other) != len(shape) or not 0 <= self.dim < len(shape):
                raise PlanError(f"A concat step along axis {self.dim} cannot join shapes {shape} and {other}.")
            if any(a != b for i, (a, b) in enumerate(zip(shape, other)) if i != self.dim):
                raise PlanError(f"A concat step along axis {self.dim} cannot join shapes {shape} and {other}.")
        elif broadcast(shape, other) is None:
            raise PlanError(f"A {kind.value} step's shapes {shape} and {other} do not broadcast.")
        if math.prod(self.out_shape) > MAX_FEATURES:
            raise PlanError(f"A {kind.value} step's result exceeds {MAX_FEATURES} values.")

    def _check_pool(self, shape: tuple[int, ...]) -> None:
        c, h, w = shape
        for k, s, p, d in zip(self.kernel, self.stride, self.padding, self.dilation):
            if k < 1 or s < 1 or d < 1 or p < 0 or 2 * p > k:
                raise PlanError(
                    f"Max-pool window {self.kernel} stride {self.stride} padding {self.padding} dilation "
                    f"{self.dilation} is invalid: kernel, stride and dilation must be positive and the padding "
                    "at most half the kernel."
                )
        out = self.out_shape
        if min(out) < 1:
            raise PlanError(f"Max-pool step {self.kernel}/{self.stride} does not fit its input shape {shape}.")
        for n, o_len, k, s, p, d in zip((h, w), out[1:], self.kernel, self.stride, self.padding, self.dilation):
            if o_len * k <= MAX_POOL_WORK and not all(
                any(0 <= o * s - p + t * d < n for t in range(k)) for o in range(o_len)
            ):
                raise PlanError(f"Max-pool step {self.kernel} on shape {shape} has a window that sees only padding.")
        (ph, pw), (rh, rw) = self.padding, self.pool_right_padding
        work = math.prod(out) * math.prod(self.kernel)
        if c * (h + ph + rh) * (w + pw + rw) > MAX_POOL_PADDED or work > MAX_POOL_WORK:
            raise PlanError(f"Max-pool step {self.kernel} on shape {shape} is too large.")

    @property
    def pool_right_padding(self) -> tuple[int, int]:
        """The ``-inf`` padding below and right of the input that every max-pool window needs (ceil mode)."""
        axes = zip(self.in_shape[1:], self.out_shape[1:], self.kernel, self.stride, self.padding, self.dilation)
        below, right = (max(0, (o - 1) * s + d * (k - 1) + 1 - n - p) for n, o, k, s, p, d in axes)
        return below, right

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.kind in (OpKind.ADD, OpKind.MUL):
            return broadcast(self.in_shape, self.operand_shape) or self.in_shape
        if self.kind is OpKind.CONCAT:
            joined = self.in_shape[self.dim] + self.operand_shape[self.dim]
            return (*self.in_shape[: self.dim], joined, *self.in_shape[self.dim + 1 :])
        if self.kind is OpKind.ADAPTIVE_MAXPOOL2D:
            return (self.in_shape[0], *self.output_size)
        if self.kind is not OpKind.MAXPOOL2D:
            return self.in_shape
        c, h, w = self.in_shape
        geometry = zip((h, w), self.kernel, self.stride, self.padding, self.dilation)
        oh, ow = (pool_length(n, k, s, p, d, self.ceil_mode) for n, k, s, p, d in geometry)
        return (c, oh, ow)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"kind": self.kind.value, "in_shape": list(self.in_shape)}
        for name in FIELDS.get(self.kind, ()):
            value = getattr(self, name)
            wire[name] = list(value) if isinstance(value, tuple) else value
        return wire

    @classmethod
    def from_wire(cls, d: Any) -> EnclaveOp:
        if not isinstance(d, dict):
            raise PlanError(f"Malformed enclave step {d!r:.80}.")
        kind = OpKind.parse(d.get("kind"))
        expected = {"kind", "in_shape", *FIELDS.get(kind, ())}
        if set(d) != expected:
            got = sorted(str(k)[:20] for k in list(d)[:16])
            raise PlanError(f"A {kind.value} step has the fields {sorted(expected)}, got {got}.")
        values = {}
        for name in FIELDS.get(kind, ()):
            value = d[name]
            if name in ("kernel", "stride", "padding", "dilation", "output_size"):
                value = _ints(value, f"The {name} of a {kind.value} step", 2)
            elif name == "operand_shape":
                value = _ints(value, f"The operand shape of a {kind.value} step")
            elif name == "approximate" and not isinstance(value, str):
                raise PlanError(f"GELU's form must be one of {GELU_FORMS}, got {value!r:.40}.")
            values[name] = value
        return cls(kind, _ints(d["in_shape"], f"The input shape of a {kind.value} step"), **values)
