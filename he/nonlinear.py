"""The exact nonlinear steps, on decrypted activations (numpy, float64)."""

from __future__ import annotations

import numpy as np

from .graph import EnclaveOp, OpKind


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def maxpool2d(x: np.ndarray, op: EnclaveOp) -> np.ndarray:
    """Max-pooling over ``(C, H, W)`` with implicit ``-inf`` padding, as torch defines it."""
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    padded = np.pad(x.reshape(op.in_shape), ((0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    c, oh, ow = op.out_shape
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))
    return windows[:, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw].max(axis=(-2, -1))


def apply_ops(x: np.ndarray, ops: tuple[EnclaveOp, ...]) -> np.ndarray:
    """Apply a stage's nonlinear steps in order; returns the flattened result."""
    for op in ops:
        x = relu(x) if op.kind is OpKind.RELU else maxpool2d(x, op)
    return np.asarray(x).reshape(-1)
