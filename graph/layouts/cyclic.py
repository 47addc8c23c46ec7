"""The cyclic layout of a dense affine layer, laid out so the server rotates little.

A layout computes ``y = W x`` for a ``rows x cols`` matrix; the enclave adds a
layer's bias after decrypting (see ``heclave.graph.model.Stage``). The formulas below call
the input ``x'`` and the matrix ``W'`` because a layout serves any matrix.

The layer works in *blocks* of ``p`` slots. Input chunk ``i`` of ``x'`` (``c``
values) is laid out cyclically with period ``p`` across the whole ciphertext:
slot ``s`` holds ``x'[i*c + (s mod p)]``. The enclave (or, for the first layer,
the data owner) writes that layout when it encrypts, which is the freedom that
makes the layer cheap. Each block serves ``K`` output rows at once: row offset
``r`` of a block owns slots ``r, r+K, r+2K, ...`` of that block, and the ``K``
generalised diagonals ``d_k[s] = W'[row(s), (s mod p + k) mod p]`` give

    z = sum_k d_k * rot(v, k)

whose slots hold ``T = p / K`` partial sums per row. The server evaluates the
sum with baby-step giant-step (``B`` baby rotations of the input, ``G`` giant
rotations of the partial results) and leaves the partial sums for the enclave,
which adds them up for free after the decryption it does anyway. A layer with
more rows than one ciphertext holds uses several output ciphertexts that share
the baby-step rotations; a layer with more inputs than slots uses several
input chunks whose products are added before the giant rotations.

CKKS slots are complex and the weights real, so every layout has two lanes:
a batch puts a second set of queries in the imaginary parts (``LANES``), and a
single query, whose input is real, can use complex diagonals to put a second
row in each slot instead (:class:`PairedRows`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from heclave.protocol.errors import PlanError

from .base import Layout, plausible, tile


@dataclass(frozen=True)
class CyclicLayout(Layout):
    """The cyclic layout of the module docstring: dense layers; plain data in the plan."""

    kind = "cyclic"

    rows: int
    cols: int
    slots: int
    k: int
    period: int
    chunk: int
    baby: int
    giant: int
    queries: int = 1

    @property
    def blocks(self) -> int:
        """Blocks per ciphertext (one query), or per query's region (several)."""
        if self.queries > 1:
            return math.ceil(self.rows / self.k)
        if self.slots % self.period == 0:
            return self.slots // self.period
        return (self.slots - (self.k - 1)) // self.period

    @property
    def region(self) -> int:
        """Slots one query occupies when several share a ciphertext, wrap-around reads included."""
        return self.blocks * self.period + self.k - 1

    @property
    def rows_per_ct(self) -> int:
        return self.k * self.blocks

    @property
    def in_cts(self) -> int:
        return math.ceil(self.cols / self.chunk)

    @property
    def out_cts(self) -> int:
        return math.ceil(self.rows / self.rows_per_ct)

    def to_wire(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_wire(cls, data: dict) -> CyclicLayout:
        values = {k: data.get(k) for k in cls.__dataclass_fields__}
        if not all(type(v) is int for v in values.values()):
            raise PlanError(f"A cyclic layout needs integer fields {', '.join(values)}.")
        layout = cls(**values)
        layout.validate()
        return layout

    def validate(self) -> None:
        """Refuse a layout whose rotations would read outside its input layout."""
        ok = (
            plausible(self.rows, self.cols, self.slots)
            and 0 < self.k <= self.period <= self.slots
            and self.period % self.k == 0
            and 0 < self.chunk <= self.period
            and self.blocks >= 1
            and self.baby >= 1
            and self.giant >= 1
            and self.baby * self.giant >= self.k
            and self.queries >= 1
            and (self.queries == 1 or (self.in_cts == 1 and self.queries * self.region <= self.slots))
        )
        if not ok:
            raise PlanError(f"Inconsistent cyclic layout {self}.")

    @cached_property
    def input_index(self) -> np.ndarray:
        """``[in_cts, slots]`` indices into the queries' ``x'`` (``-1`` for a zero slot)."""
        if self.queries > 1:
            return tile(self._single_input(self.region), self.region, self.queries, self.cols, self.slots)
        return self._single_input(self.slots)

    def _single_input(self, span: int) -> np.ndarray:
        u = np.arange(span) % self.period
        idx = np.full((self.in_cts, span), -1, dtype=np.int64)
        for i in range(self.in_cts):
            col = i * self.chunk + u
            valid = (u < self.chunk) & (col < self.cols)
            idx[i, valid] = col[valid]
        return idx

    @cached_property
    def output_row(self) -> np.ndarray:
        """``[out_cts, slots]`` output row whose partial sum each slot holds (``-1``: unused)."""
        if self.queries > 1:
            return tile(self._single_output(self.region), self.region, self.queries, self.rows, self.slots)
        return self._single_output(self.slots)

    def _single_output(self, span: int) -> np.ndarray:
        s = np.arange(span)
        block, u = s // self.period, s % self.period
        local = block * self.k + u % self.k
        rows = np.full((self.out_cts, span), -1, dtype=np.int64)
        for o in range(self.out_cts):
            row = o * self.rows_per_ct + local
            valid = (block < self.blocks) & (row < self.rows) & (local < self.rows_per_ct)
            rows[o, valid] = row[valid]
        return rows
