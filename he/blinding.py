"""The prime field of blinded layers (Slalom's one-time pads): the server computes ``W (x + r) mod p``.

Weights and activations are fixed-point integers: ``W_q = round(W * 2^s_w)``
(chosen once by the model owner) and ``x_q = round(x * 2^s_x)``, where the
enclave picks ``s_x`` for each activation so that no row of ``W_q x_q`` can
leave ``(-p/2, p/2)``. The server sees only ``x_q + r`` with ``r`` uniform in the
field, which is a one-time pad; the enclave removes ``W_q r`` (computed inside
the enclave) and divides by ``2^(s_x + s_w)``.

The field is the Mersenne prime ``2^31 - 1``, not Slalom's ``2^24 - 3``: a row's
worst-case sum must fit in ``p/2``, and at ``2^24`` a 12-bit weight leaves an
activation only about 5 bits. Products are computed exactly in int64 by
splitting each activation into two 16-bit limbs (every partial product is below
``2^47``, so sums of ``2^16`` of them cannot overflow).
"""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import PlanError

P = 2_147_483_647  # 2**31 - 1, prime
HALF = P // 2
LIMB = 1 << 16


def weight_scale(weights: np.ndarray, target_bits: int = 12) -> int:
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
    high, low = np.divmod(np.asarray(v, dtype=np.int64), LIMB)
    total_high = np.zeros(w_q.shape[0], dtype=np.int64)
    total_low = np.zeros(w_q.shape[0], dtype=np.int64)
    for start in range(0, w_q.shape[1], LIMB):
        block = w_q[:, start : start + LIMB]
        total_high = np.mod(total_high + block @ high[start : start + LIMB], P)
        total_low = np.mod(total_low + block @ low[start : start + LIMB], P)
    return np.mod(total_high * LIMB + total_low, P)


def centred(values: np.ndarray) -> np.ndarray:
    """Field elements as signed integers in ``(-p/2, p/2]``."""
    return np.where(values > HALF, values - P, values)
