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
splitting each activation into two 16-bit limbs (``arith.sparse``).
"""

from __future__ import annotations

import math

import numpy as np

from heclave.protocol.errors import PlanError

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


def activation_scale(row_abs_sums: np.ndarray, x: np.ndarray) -> int:
    """Fraction bits for ``x`` such that no row of ``W_q x_q`` can reach ``p/2`` (given ``sum |W_q|`` per row)."""
    bound = float(np.max(row_abs_sums, initial=0.0)) * float(np.abs(x).max(initial=0.0))
    if bound == 0.0:
        return 0
    return int(math.floor(math.log2((HALF - 1) / bound)))


def centred(values: np.ndarray) -> np.ndarray:
    """Field elements as signed integers in ``(-p/2, p/2]``."""
    return np.where(values > HALF, values - P, values)
