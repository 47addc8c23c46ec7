"""The exact nonlinear steps, on decrypted activations (numpy, float64).

Each step agrees with torch's to within float64 rounding: no polynomial or
table approximations. GELU's erf form calls the C library's ``erfc``
(``math.erfc``, accurate to about one ulp) value by value, about 0.2 µs each;
softmax, log-softmax and sigmoid are written so that no intermediate
overflows. The enclave runs this module: numpy and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from heclave.graph.ops import BINARY, EnclaveOp, OpKind
from heclave.protocol.errors import PlanError

SQRT_HALF = math.sqrt(0.5)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def erfc(x: np.ndarray) -> np.ndarray:
    """The complementary error function, element by element through the C library (numpy has none)."""
    return np.fromiter(map(math.erfc, x.ravel().tolist()), np.float64, count=x.size).reshape(x.shape)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + e^-x)``, with ``e^x / (1 + e^x)`` for negative ``x`` so that nothing overflows."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    """``x Φ(x)`` as ``x/2 erfc(-x/√2)`` (no cancellation for negative ``x``), or torch's tanh form."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
    return 0.5 * x * erfc(-SQRT_HALF * x)


def elu(x: np.ndarray, alpha: float) -> np.ndarray:
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def hardsigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def softmax(x: np.ndarray, dim: int, log: bool = False) -> np.ndarray:
    """(Log-)softmax along ``dim``, shifted by the maximum so that ``exp`` never overflows."""
    shifted = x - x.max(axis=dim, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=dim, keepdims=True)
    return shifted - np.log(total) if log else e / total


def layer_norm(x: np.ndarray, axes: int, eps: float) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps)`` over the trailing ``axes`` axes, with the biased variance (as torch)."""
    over = tuple(range(x.ndim - axes, x.ndim))
    centred = x - x.mean(axis=over, keepdims=True)
    return centred / np.sqrt((centred * centred).mean(axis=over, keepdims=True) + eps)


def maxpool2d(x: np.ndarray, op: EnclaveOp) -> np.ndarray:
    """Max-pooling over ``(C, H, W)`` with implicit ``-inf`` padding, dilation and ceil mode, as torch defines it."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.kernel, op.stride, op.padding, op.dilation
    below, right = op.pool_right_padding
    padded = np.pad(x.reshape(op.in_shape), ((0, 0), (ph, below), (pw, right)), constant_values=-np.inf)
    _, oh, ow = op.out_shape
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(1, 2))[..., ::dh, ::dw]
    return windows[:, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw].max(axis=(-2, -1))


def adaptive_maxpool2d(x: np.ndarray, op: EnclaveOp) -> np.ndarray:
    """Torch's adaptive max-pool: output ``i`` of a side ``n`` pooled to ``m`` covers ``floor(i n/m)`` to
    ``ceil((i+1) n/m)``, rows first, then columns."""
    x = x.reshape(op.in_shape)
    (_, h, w), (oh, ow) = op.in_shape, op.output_size
    rows = np.stack([x[:, i * h // oh : -(-(i + 1) * h // oh)].max(axis=1) for i in range(oh)], axis=1)
    return np.stack([rows[:, :, j * w // ow : -(-(j + 1) * w // ow)].max(axis=2) for j in range(ow)], axis=2)


def combine(x: np.ndarray, op: EnclaveOp, operand: np.ndarray) -> np.ndarray:
    """An add, mul or concat step of ``x`` (in ``op.in_shape``) with the earlier value ``operand``."""
    other = np.asarray(operand, dtype=np.float64).reshape(op.operand_shape)
    if op.kind is OpKind.ADD:
        return x + other
    if op.kind is OpKind.MUL:
        return x * other
    return np.concatenate([other, x] if op.before else [x, other], axis=op.dim)


def apply_op(x: np.ndarray, op: EnclaveOp, values: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """One step on an activation of ``op.in_shape`` values (any shape); the result in ``op.out_shape``.

    ``values`` holds the graph's earlier values (one sample's each) that add, mul
    and concat steps name.
    """
    x = np.asarray(x, dtype=np.float64).reshape(op.in_shape)
    kind = op.kind
    if kind in BINARY:
        if values is None or op.operand not in values:
            raise PlanError(f"A {kind.value} step needs value {op.operand}, which is not at hand.")
        return combine(x, op, values[op.operand])
    if kind is OpKind.RELU:
        return relu(x)
    if kind is OpKind.RELU6:
        return np.clip(x, 0.0, 6.0)
    if kind is OpKind.LEAKY_RELU:
        return np.where(x > 0, x, x * op.slope)
    if kind is OpKind.ELU:
        return elu(x, op.alpha)
    if kind is OpKind.SIGMOID:
        return sigmoid(x)
    if kind is OpKind.TANH:
        return np.tanh(x)
    if kind is OpKind.GELU:
        return gelu(x, op.approximate)
    if kind is OpKind.SILU:
        return x * sigmoid(x)
    if kind is OpKind.HARDSWISH:
        return x * hardsigmoid(x)
    if kind is OpKind.HARDSIGMOID:
        return hardsigmoid(x)
    if kind in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
        return softmax(x, op.dim, log=kind is OpKind.LOG_SOFTMAX)
    if kind is OpKind.LAYER_NORM:
        return layer_norm(x, op.axes, op.eps)
    if kind is OpKind.MAXPOOL2D:
        return maxpool2d(x, op)
    if kind is OpKind.ADAPTIVE_MAXPOOL2D:
        return adaptive_maxpool2d(x, op)
    raise NotImplementedError(f"no kernel for enclave step {kind.value}")


def apply_ops(x: np.ndarray, ops: tuple[EnclaveOp, ...], values: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """Apply a stage's nonlinear steps in order (with the earlier ``values`` they name); the flattened result."""
    for op in ops:
        x = apply_op(x, op, values)
    return np.asarray(x).reshape(-1)
