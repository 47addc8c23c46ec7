"""Slot layouts of one encrypted affine layer, chosen so the server rotates little.

An affine layer ``y = W x + b`` becomes ``y = W' x'`` with ``x' = [x, 1]`` and
``W' = [W | b]``, so the bias costs nothing and both weight forms share one path.

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from protocol.errors import PlanError


@dataclass(frozen=True)
class UnitCosts:
    """Milliseconds per operation, used to choose a layout (``heclave calibrate`` will measure them)."""

    rotation: float = 1.3
    rotation_rescaled: float = 0.67
    rescale: float = 0.36
    multiply_plain: float = 0.11
    multiply_cipher: float = 0.25
    relinearize: float = 1.3
    add: float = 0.04
    enclave_decrypt: float = 0.7
    enclave_encrypt: float = 1.5
    enclave_factor: float = 2.0


@dataclass(frozen=True)
class LinearGeometry:
    """The slot layout of one affine layer; plain data, part of the deployment plan."""

    rows: int
    cols: int
    slots: int
    k: int
    period: int
    chunk: int
    baby: int
    giant: int

    @property
    def blocks(self) -> int:
        if self.slots % self.period == 0:
            return self.slots // self.period
        return (self.slots - (self.k - 1)) // self.period

    @property
    def rows_per_ct(self) -> int:
        return self.k * self.blocks

    @property
    def in_cts(self) -> int:
        return math.ceil(self.cols / self.chunk)

    @property
    def out_cts(self) -> int:
        return math.ceil(self.rows / self.rows_per_ct)

    @property
    def rotation_steps(self) -> list[int]:
        """The left-rotation steps the server needs Galois keys for."""
        baby = [b for b in range(1, self.baby) if b < self.k]
        giant = [g * self.baby for g in range(1, self.giant) if g * self.baby < self.k]
        return sorted(set(baby + giant))

    def counts(self) -> dict[str, int]:
        """Operations the server performs per query (at most: all-zero diagonals are skipped)."""
        used_giants = len([g for g in range(self.giant) if g * self.baby < self.k])
        baby = self.in_cts * (min(self.baby, self.k) - 1)
        giant = self.out_cts * (used_giants - 1)
        return {
            "rotations": baby + giant,
            "baby_rotations": baby,
            "giant_rotations": giant,
            "rescales": self.out_cts * used_giants,
            "multiplications": self.in_cts * self.out_cts * self.k,
            "input_ciphertexts": self.in_cts,
            "output_ciphertexts": self.out_cts,
        }

    def to_wire(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict) -> "LinearGeometry":
        try:
            geometry = cls(**{k: int(data[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError):
            raise PlanError("A linear layer's geometry is malformed.") from None
        geometry.validate()
        return geometry

    def validate(self) -> None:
        """Refuse a geometry whose rotations would read outside its input layout."""
        ok = (
            0 < self.k <= self.period <= self.slots
            and self.period % self.k == 0
            and 0 < self.chunk <= self.period
            and self.blocks >= 1
            and self.baby >= 1
            and self.giant >= 1
            and self.baby * self.giant >= self.k
            and self.rows > 0
            and self.cols > 0
        )
        if not ok:
            raise PlanError(f"Inconsistent linear-layer geometry {self}.")

    @cached_property
    def input_index(self) -> np.ndarray:
        """``[in_cts, slots]`` indices into ``x'`` (``-1`` for a zero slot)."""
        u = np.arange(self.slots) % self.period
        idx = np.full((self.in_cts, self.slots), -1, dtype=np.int64)
        for i in range(self.in_cts):
            col = i * self.chunk + u
            valid = (u < self.chunk) & (col < self.cols)
            idx[i, valid] = col[valid]
        return idx

    @cached_property
    def output_row(self) -> np.ndarray:
        """``[out_cts, slots]`` output row whose partial sum each slot holds (``-1``: unused)."""
        s = np.arange(self.slots)
        block, u = s // self.period, s % self.period
        local = block * self.k + u % self.k
        rows = np.full((self.out_cts, self.slots), -1, dtype=np.int64)
        for o in range(self.out_cts):
            row = o * self.rows_per_ct + local
            valid = (block < self.blocks) & (row < self.rows) & (local < self.rows_per_ct)
            rows[o, valid] = row[valid]
        return rows

    def gather(self, x_aug: np.ndarray) -> np.ndarray:
        """Lay out ``x' = [x, 1]`` (or a batch's worth, last axis) in this layer's input slots."""
        padded = np.concatenate([x_aug, np.zeros(1)])
        return padded[self.input_index]

    def scatter(self, partials: np.ndarray) -> np.ndarray:
        """Sum decrypted partial sums ``[out_cts, slots]`` into the layer's output vector."""
        rows = self.output_row.ravel()
        used = rows >= 0
        return np.bincount(rows[used], weights=partials.ravel()[used], minlength=self.rows)

    def diagonals(self, weights: np.ndarray) -> np.ndarray:
        """``[out_cts, in_cts, k, slots]`` diagonals, each pre-rotated by minus its giant step."""
        rows_all, cols_all = self.output_row, self.input_index
        out = np.zeros((self.out_cts, self.in_cts, self.k, self.slots))
        for o in range(self.out_cts):
            rows = rows_all[o]
            for i in range(self.in_cts):
                for k in range(self.k):
                    cols = np.roll(cols_all[i], -k)
                    valid = (rows >= 0) & (cols >= 0)
                    d = np.zeros(self.slots)
                    d[valid] = weights[rows[valid], cols[valid]]
                    out[o, i, k] = np.roll(d, (k // self.baby) * self.baby)
        return out


def _best_split(k: int, in_cts: int, out_cts: int) -> tuple[int, int]:
    """Baby and giant step counts that minimise rotations for ``k`` diagonals."""
    best = (k, 1)
    best_cost = in_cts * (k - 1)
    for baby in range(1, k + 1):
        giant = math.ceil(k / baby)
        cost = in_cts * (baby - 1) + out_cts * (giant - 1)
        if cost < best_cost:
            best, best_cost = (baby, giant), cost
    return best


def choose_geometry(
    rows: int, cols: int, slots: int, encrypted_weights: bool, costs: UnitCosts = UnitCosts()
) -> LinearGeometry:
    """The cheapest layout, by the cost model, for a ``rows x cols`` affine layer (``cols`` counts the bias)."""
    if rows < 1 or cols < 1:
        raise PlanError(f"An affine layer needs at least one row and one column, got {rows}x{cols}.")
    multiply = costs.multiply_cipher if encrypted_weights else costs.multiply_plain
    best: tuple[float, LinearGeometry] | None = None
    in_cts = math.ceil(cols / slots)
    chunk = math.ceil(cols / in_cts)
    for k in range(1, slots + 1):
        period = math.ceil(chunk / k) * k
        if period > slots:
            break
        candidate = LinearGeometry(rows, cols, slots, k, period, chunk, 1, k)
        if candidate.blocks < 1:
            continue
        baby, giant = _best_split(k, in_cts, candidate.out_cts)
        g = LinearGeometry(rows, cols, slots, k, period, chunk, baby, giant)
        c = g.counts()
        cost = (
            c["baby_rotations"] * costs.rotation
            + c["giant_rotations"] * costs.rotation_rescaled
            + c["rescales"] * costs.rescale
            + c["multiplications"] * (multiply + costs.add)
            + (g.out_cts * giant * costs.relinearize if encrypted_weights else 0.0)
            + costs.enclave_factor * (g.out_cts * costs.enclave_decrypt + in_cts * costs.enclave_encrypt)
        )
        if best is None or cost < best[0]:
            best = (cost, g)
    if best is None:
        raise PlanError(f"No slot layout fits a {rows}x{cols} layer in {slots} slots.")
    return best[1]
