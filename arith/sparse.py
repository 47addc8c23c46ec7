"""Sparse weight matrices for the layers that are not evaluated under CKKS.

A composed affine map is stored densely by ``plan/``, but a convolution's matrix
is mostly zeros: a 3x3 convolution of a 32x32x3 image has 28 nonzeros in each of
its 4096 rows, against 3073 columns. ``enclave``, ``blinded`` and ``plain``
layers therefore travel and run as coordinate lists, with products formed only
for the nonzeros: the enclave never holds a dense copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import msgpack
import numpy as np

from heclave.protocol.errors import ErrorCode, ProtocolError

from .blinding import LIMB, P

MAX_ROW_NONZEROS = 1 << 22


@dataclass(frozen=True)
class SparseMatrix:
    """A ``rows x cols`` matrix given by its nonzero entries (float64 weights or field integers)."""

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        if len(self.rows) and np.bincount(self.rows).max() >= MAX_ROW_NONZEROS:
            raise ProtocolError("A weight matrix has a row too long for exact field sums.", ErrorCode.BAD_FIELD)

    @classmethod
    def from_dense(cls, matrix: np.ndarray) -> SparseMatrix:
        rows, cols = np.nonzero(matrix)
        return cls(matrix.shape, rows.astype(np.int64), cols.astype(np.int64), matrix[rows, cols])

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "shape": list(self.shape),
                "rows": self.rows.astype("<i4").tobytes(),
                "cols": self.cols.astype("<i4").tobytes(),
                "dtype": "f8" if self.values.dtype.kind == "f" else "i8",
                "values": self.values.astype("<f8" if self.values.dtype.kind == "f" else "<i8").tobytes(),
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes, shape: tuple[int, int], dtype: str) -> SparseMatrix:
        """Parse and check a matrix that must have ``shape`` and value type ``dtype`` (``f8`` or ``i8``)."""
        try:
            d = msgpack.unpackb(data, raw=False)
            rows = np.frombuffer(d["rows"], dtype="<i4").astype(np.int64)
            cols = np.frombuffer(d["cols"], dtype="<i4").astype(np.int64)
            values = np.frombuffer(d["values"], dtype="<" + dtype)
            ok = tuple(d["shape"]) == tuple(shape) and d["dtype"] == dtype and len(rows) == len(cols) == len(values)
        except Exception:
            ok = False
        if not ok or (
            len(rows) and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1])
        ):
            raise ProtocolError(
                f"A weight matrix is malformed or not the {shape[0]}x{shape[1]} the layer needs.", ErrorCode.BAD_FIELD
            )
        if dtype == "i8" and len(values) and (values.min() < 0 or values.max() >= P):
            raise ProtocolError("A blinded layer's weights must be field elements.", ErrorCode.BAD_FIELD)
        return cls(tuple(shape), rows, cols, values)

    def apply(self, xs: np.ndarray) -> np.ndarray:
        """``xs @ M.T`` for a batch ``[B, cols]`` of float64 activations."""
        out = np.zeros((len(xs), self.shape[0]))
        for b, x in enumerate(xs):
            out[b] = np.bincount(self.rows, weights=self.values * x[self.cols], minlength=self.shape[0])
        return out

    def apply_mod(self, v: np.ndarray) -> np.ndarray:
        """``M @ v mod p`` exactly, for field elements.

        Each product is split into 16-bit limbs so it fits int64, reduced mod p
        (below 2^31), and summed per row in float64, which is exact because no
        row has 2^22 nonzeros (checked once, when the matrix is made).
        """
        high, low = np.divmod(np.asarray(v, dtype=np.int64)[self.cols], LIMB)
        sums = []
        for limb in (high, low):
            products = np.mod(self.values * limb, P).astype(np.float64)
            sums.append(np.mod(np.bincount(self.rows, weights=products, minlength=self.shape[0]).astype(np.int64), P))
        return np.mod(sums[0] * LIMB + sums[1], P)

    @cached_property
    def abs_row_sums(self) -> np.ndarray:
        """Sum of |entries| per row (field elements read as signed), for choosing a blinded scale."""
        values = self.values.astype(np.float64)
        if self.values.dtype.kind == "i":
            values = np.where(self.values > P // 2, self.values - P, self.values).astype(np.float64)
        return np.bincount(self.rows, weights=np.abs(values), minlength=self.shape[0])
