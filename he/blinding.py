"""The prime field of blinded layers (Slalom's one-time pads): the server computes ``W (x + r) mod p``.

Weights and activations are fixed-point integers: ``W_q = round(W * 2^s_w)``
(chosen once by the model owner) and ``x_q = round(x * 2^s_x)``, where the
enclave picks ``s_x`` for each activation so that no row of ``W_q x_q`` can
leave ``(-p/2, p/2)``. The server sees only ``x_q + r`` with ``r`` uniform in the
field, which is a one-time pad; the enclave removes ``W_q r`` (computed inside
the enclave) and divides by ``2^(s_x + s_w)``. With ``p < 2^24`` every product of
two field elements is below ``2^48``, so int64 sums of up to ``2^15`` of them are
exact; longer rows are reduced in chunks.
"""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import PlanError

P = 16_777_213  # 2**24 - 3, prime (Slalom's field)
HALF = P // 2
CHUNK = 1 << 15


def weight_scale(weights: np.ndarray, target_bits: int = 14) -> int:
    """Fraction bits for the weights: their largest magnitude maps to about ``2^target_bits``."""
    largest = float(np.abs(weights).max())
    if largest == 0.0:
        return target_bits
    return int(math.floor(target_bits - math.log2(largest)))


def quantize(values: np.ndarray, bits: int) -> np.ndarray:
    """``round(values * 2^bits)`` as integers in ``[0, p)`` (negatives wrapped)."""
    q = np.round(np.asarray(values, dtype=np.float64) * 2.0**bits).astype(np.int64)
    if np.abs(q).max(initial=0) >= HALF:
        raise PlanError(f"Values do not fit the field at {bits} fraction bits; use fewer.")
    return np.mod(q, P)


def activation_scale(w_q: np.ndarray, x: np.ndarray) -> int:
    """Fraction bits for ``x`` such that no row of ``W_q x_q`` can reach ``p/2``."""
    centred = np.where(w_q > HALF, w_q - P, w_q).astype(np.float64)
    bound = float(np.abs(centred).sum(axis=1).max()) * float(np.abs(x).max(initial=0.0))
    if bound == 0.0:
        return 0
    return int(math.floor(math.log2((HALF - 1) / bound)))


def matmul_mod(w_q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``w_q @ v mod p`` exactly, for field elements in ``[0, p)``."""
    total = np.zeros(w_q.shape[0], dtype=np.int64)
    for start in range(0, w_q.shape[1], CHUNK):
        part = w_q[:, start : start + CHUNK] @ v[start : start + CHUNK]
        total = np.mod(total + np.mod(part, P), P)
    return total


def centred(values: np.ndarray) -> np.ndarray:
    """Field elements as signed integers in ``(-p/2, p/2]``."""
    return np.where(values > HALF, values - P, values)
