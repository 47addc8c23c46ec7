"""What every slot layout of an encrypted affine layer provides, and what the layout kinds share.

A layout computes ``y = W x`` for a ``rows x cols`` matrix with a few
rotations; the enclave adds a layer's bias after decrypting (see
``heclave.graph.model.Stage``). The kinds are :mod:`.cyclic` (dense layers),
:mod:`.grouped` (sparse layers such as convolutions) and :mod:`.paired`
(two rows per complex slot); the package (:func:`heclave.graph.layouts.layout_from_wire`) reads any of them from a
plan, and ``plan.layouts`` chooses among them with the cost model.

CKKS slots are complex and the weights real, so every layout has two lanes:
a batch puts a second set of queries in the imaginary parts (``LANES``), and a
single query, whose input is real, can use complex diagonals to put a second
row in each slot instead (:class:`.paired.PairedRows`).
"""

from __future__ import annotations

import math

import numpy as np

# CKKS slots hold complex numbers and the weights are real, so ``W (x + i y) = W x + i W y``: a
# ciphertext carries a second batch of queries in its imaginary parts for no extra operation.
LANES = 2

MAX_FEATURES = 1 << 22


class Layout:
    """What every slot layout provides; the server's kernel and the enclave use only this.

    A layout is given by two maps: which entry of ``x'`` each input slot holds
    (``input_index``) and whose partial sum each output slot accumulates
    (``output_row``), plus ``k`` rotations split into baby and giant steps.
    Diagonal ``k`` of output ciphertext ``o`` and input ciphertext ``i`` is
    ``d[s] = W'[output_row[o, s], input_index[i, s + k]]`` where both are defined
    and the pair is linked.
    """

    rows: int
    cols: int
    slots: int
    k: int
    baby: int
    giant: int
    kind: str

    input_index: np.ndarray
    output_row: np.ndarray
    queries: int = 1

    @property
    def in_cts(self) -> int:
        return int(self.input_index.shape[0])

    @property
    def out_cts(self) -> int:
        return int(self.output_row.shape[0])

    def linked(self, o: int, i: int) -> bool:
        """Whether output ciphertext ``o`` takes products from input ciphertext ``i``."""
        return True

    @property
    def rotation_steps(self) -> list[int]:
        """The left-rotation steps the server needs Galois keys for."""
        baby = [b for b in range(1, self.baby) if b < self.k]
        giant = [g * self.baby for g in range(1, self.giant) if g * self.baby < self.k]
        return sorted(set(baby + giant))

    def counts(self) -> dict[str, int]:
        """Operations the server performs per query (at most: all-zero diagonals are skipped)."""
        used_giants = len([g for g in range(self.giant) if g * self.baby < self.k])
        links = sum(self.linked(o, i) for o in range(self.out_cts) for i in range(self.in_cts))
        baby = self.in_cts * (min(self.baby, self.k) - 1)
        giant = self.out_cts * (used_giants - 1)
        return {
            "rotations": baby + giant,
            "baby_rotations": baby,
            "giant_rotations": giant,
            "rescales": self.out_cts * used_giants,
            "multiplications": links * self.k,
            "input_ciphertexts": self.in_cts,
            "output_ciphertexts": self.out_cts,
        }

    def gather(self, x: np.ndarray) -> np.ndarray:
        """Lay out ``x'`` in this layer's input slots: ``[in_cts, slots]``.

        ``x`` is one query's ``cols`` values, or up to ``queries`` of them as rows.
        """
        values = np.asarray(x, dtype=np.float64).reshape(-1)
        if values.size > self.queries * self.cols:
            raise ValueError(f"{values.size} values do not fit a layout of {self.queries} x {self.cols} inputs.")
        # The last entry stays zero: it is what unused slots (index -1) read.
        flat = np.zeros(self.queries * self.cols + 1)
        flat[: values.size] = values
        return flat[self.input_index]

    def scatter(self, partials: np.ndarray) -> np.ndarray:
        """Sum the real parts of decrypted partial sums ``[out_cts, slots]``: one vector, or ``[queries, rows]``."""
        rows = self.output_row.ravel()
        used = rows >= 0
        sums = np.bincount(rows[used], weights=np.real(partials).ravel()[used], minlength=self.queries * self.rows)
        return sums if self.queries == 1 else sums.reshape(self.queries, self.rows)

    def groups(self, batch: int) -> int:
        """Ciphertext groups (of ``in_cts`` inputs, ``out_cts`` outputs) a batch of queries needs."""
        return math.ceil(batch / (self.queries * LANES))

    def gather_batch(self, xs: np.ndarray) -> np.ndarray:
        """Input slots ``[groups * in_cts, slots]`` for a batch ``[B, cols]``.

        A group's first ``queries`` queries go to the slots' real parts and the
        next ``queries`` to their imaginary parts (see ``LANES``); the result is
        real when no group needs its second lane.
        """
        xs = np.asarray(xs, dtype=np.float64).reshape(len(xs), -1)
        q, laid = self.queries, []
        for g in range(self.groups(len(xs))):
            group = xs[g * LANES * q : (g + 1) * LANES * q]
            real = self.gather(group[:q])
            laid.append(real + 1j * self.gather(group[q:]) if len(group) > q else real)
        return np.concatenate(laid)

    def scatter_batch(self, partials: np.ndarray, batch: int) -> np.ndarray:
        """Outputs ``[B, rows]`` from decrypted (complex) partial sums ``[groups * out_cts, slots]``."""
        n, sums = self.out_cts, []
        for g in range(self.groups(batch)):
            block = np.asarray(partials[g * n : (g + 1) * n])
            sums += [self.scatter(lane).reshape(self.queries, self.rows) for lane in (block.real, block.imag)]
        return np.concatenate(sums)[:batch]

    def diagonals(self, weights: np.ndarray) -> np.ndarray:
        """``[out_cts, in_cts, k, slots]`` diagonals, each pre-rotated by minus its giant step."""
        out = np.zeros((self.out_cts, self.in_cts, self.k, self.slots))
        for o in range(self.out_cts):
            rows = self.output_row[o]
            for i in range(self.in_cts):
                if not self.linked(o, i):
                    continue
                for k in range(self.k):
                    cols = np.roll(self.input_index[i], -k)
                    # A product pairs an output and an input of the same query only.
                    valid = (rows >= 0) & (cols >= 0) & (rows // self.rows == cols // self.cols)
                    d = np.zeros(self.slots)
                    d[valid] = weights[rows[valid] % self.rows, cols[valid] % self.cols]
                    out[o, i, k] = np.roll(d, (k // self.baby) * self.baby)
        return out

    def describe(self) -> str:
        text = f"{self.kind} k={self.k} baby={self.baby} giant={self.giant} in_cts={self.in_cts} out_cts={self.out_cts}"
        return text + (f" queries={self.queries}" if self.queries > 1 else "")

    def to_wire(self) -> dict:
        raise NotImplementedError


def plausible(rows: int, cols: int, slots: int) -> bool:
    """Bounds that keep a hostile plan from making the enclave or server allocate without limit."""
    power_of_two = 0 < slots <= 16384 and slots & (slots - 1) == 0
    return 0 < rows <= MAX_FEATURES and 0 < cols <= MAX_FEATURES and power_of_two


def best_split(k: int, in_cts: int, out_cts: int) -> tuple[int, int]:
    """Baby and giant step counts that minimise rotations for ``k`` diagonals."""
    best = (k, 1)
    best_cost = in_cts * (k - 1)
    # The optimum is near sqrt(k * out_cts / in_cts); a window around it keeps planning fast.
    limit = min(k, 4 * math.isqrt(k * out_cts // in_cts + 1) + 4)
    for baby in range(1, limit + 1):
        giant = math.ceil(k / baby)
        cost = in_cts * (baby - 1) + out_cts * (giant - 1)
        if cost < best_cost:
            best, best_cost = (baby, giant), cost
    return best


def tile(single: np.ndarray, region: int, queries: int, width: int, slots: int) -> np.ndarray:
    """Repeat one query's maps ``queries`` times, ``region`` slots apart, indexing query ``q``'s values."""
    out = np.full((single.shape[0], slots), -1, dtype=np.int64)
    for q in range(queries):
        part = single[:, :region]
        out[:, q * region : (q + 1) * region] = np.where(part >= 0, part + q * width, -1)
    return out


def pack(items: list, widths: list[int], slots: int) -> list[list] | None:
    """Consecutive items into as few ciphertexts as their widths allow; ``None`` if one cannot fit."""
    chunks: list[list] = [[]]
    used = 0
    for item, width in zip(items, widths):
        if width > slots or width == 0:
            return None
        if used + width > slots:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += width
    return chunks
