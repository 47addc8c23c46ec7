"""Two rows per complex slot: a single query's real input serves a second row in the imaginary parts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from heclave.protocol.errors import PlanError

from .base import Layout


def _from_base(name: str) -> property:
    """A read-only attribute of a wrapping layout that is its ``base`` layout's attribute."""
    return property(lambda self: getattr(self.base, name))


@dataclass(frozen=True, eq=False)
class PairedRows(Layout):
    """Two rows per slot: row ``r`` in the real part, row ``r + half`` in the imaginary part.

    A single query's input is real, so a complex diagonal ``a + i b`` gives
    ``a x + i b x``: the base layout's rotations and multiplications serve twice
    its rows, or the same rows with half the diagonals. The base layout is
    built for the ``half`` rows' combined support, so both rows of a pair find
    their inputs in the same slots. This and the query lanes of throughput mode
    (``LANES``) use the same imaginary parts, so a paired layout takes one query
    per ciphertext group.
    """

    kind = "paired"

    base: Layout
    rows: int

    # Everything but the rows comes from the base layout; ``queries`` stays Layout's 1.
    cols = _from_base("cols")
    slots = _from_base("slots")
    k = _from_base("k")
    baby = _from_base("baby")
    giant = _from_base("giant")
    input_index = _from_base("input_index")
    output_row = _from_base("output_row")  # the real parts' rows: the first ``half``

    @property
    def half(self) -> int:
        return self.base.rows

    @cached_property
    def imaginary_row(self) -> np.ndarray:
        """``[out_cts, slots]`` rows whose partial sums the imaginary parts hold (``-1``: unused)."""
        rows = self.base.output_row
        return np.where((rows >= 0) & (rows + self.half < self.rows), rows + self.half, -1)

    def linked(self, o: int, i: int) -> bool:
        return self.base.linked(o, i)

    def diagonals(self, weights: np.ndarray) -> np.ndarray:
        """Complex diagonals: the first ``half`` rows' in the real parts, the others' in the imaginary."""
        weights = np.asarray(weights)
        second = np.zeros((self.half, self.cols), dtype=weights.dtype)
        second[: self.rows - self.half] = weights[self.half :]
        return self.base.diagonals(weights[: self.half]) + 1j * self.base.diagonals(second)

    def scatter(self, partials: np.ndarray) -> np.ndarray:
        partials = np.asarray(partials)
        out = np.zeros(self.rows)
        out[: self.half] = self.base.scatter(partials.real)
        rows = self.imaginary_row.ravel()
        used = rows >= 0
        return out + np.bincount(rows[used], weights=partials.imag.ravel()[used], minlength=self.rows)

    def groups(self, batch: int) -> int:
        return batch

    def gather_batch(self, xs: np.ndarray) -> np.ndarray:
        xs = np.asarray(xs, dtype=np.float64).reshape(len(xs), -1)
        return np.concatenate([self.gather(x) for x in xs])

    def scatter_batch(self, partials: np.ndarray, batch: int) -> np.ndarray:
        n = self.out_cts
        return np.stack([self.scatter(partials[g * n : (g + 1) * n]) for g in range(batch)])

    def describe(self) -> str:
        return f"{self.base.describe()} rows paired"

    def to_wire(self) -> dict:
        return {"kind": self.kind, "rows": self.rows, "base": self.base.to_wire()}

    @classmethod
    def from_wire(cls, data: dict, base: Layout) -> PairedRows:
        """The layout a plan names, around ``base`` (read from ``data["base"]`` by ``layout_from_wire``)."""
        rows = data.get("rows")
        if type(rows) is not int or base.queries != 1 or not base.rows < rows <= 2 * base.rows:
            raise PlanError(f"A paired-rows layout of {rows!r} rows cannot pair a base of {base.rows} rows.")
        return cls(base, rows)


def paired_support(support: np.ndarray) -> np.ndarray:
    """Row ``r``'s support joined with row ``r + half``'s: what a :class:`PairedRows` base must cover."""
    half = math.ceil(support.shape[0] / 2)
    paired = support[:half].copy()
    paired[: support.shape[0] - half] |= support[half:]
    return paired
