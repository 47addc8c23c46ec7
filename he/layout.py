"""Slot layouts of one encrypted affine layer, chosen so the server rotates little.

A layout computes ``y = W x`` for a ``rows x cols`` matrix; the enclave adds a
layer's bias after decrypting (see ``he.graph.Stage``). The formulas below call
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

from protocol.errors import PlanError

# CKKS slots hold complex numbers and the weights are real, so ``W (x + i y) = W x + i W y``: a
# ciphertext carries a second batch of queries in its imaginary parts for no extra operation.
LANES = 2


# What a millisecond of enclave work costs in server milliseconds: about 2 for SGX's overheads (which
# cannot be measured without SGX), times 2 because one enclave serves every lane of a server (two on
# this project's 2-core machine), while the server's work spreads over its lanes.
ENCLAVE_FACTOR = 4.0


@dataclass(frozen=True)
class UnitCosts:
    """Milliseconds per operation, used to choose a layout; ``heclave calibrate`` measures them on a machine."""

    rotation: float = 1.3
    rotation_rescaled: float = 0.67
    rescale: float = 0.36
    multiply_plain: float = 0.11
    multiply_cipher: float = 0.25
    relinearize_rescaled: float = 0.67
    add: float = 0.04
    enclave_decrypt: float = 0.28
    enclave_encrypt: float = 0.82
    enclave_factor: float = ENCLAVE_FACTOR


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


@dataclass(frozen=True)
class LinearGeometry(Layout):
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
    def from_wire(cls, data: dict) -> LinearGeometry:
        values = {k: data.get(k) for k in cls.__dataclass_fields__}
        if not all(type(v) is int for v in values.values()):
            raise PlanError(f"A linear layer's geometry needs integer fields {', '.join(values)}.")
        geometry = cls(**values)
        geometry.validate()
        return geometry

    def validate(self) -> None:
        """Refuse a geometry whose rotations would read outside its input layout."""
        ok = (
            _plausible(self.rows, self.cols, self.slots)
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
            raise PlanError(f"Inconsistent linear-layer geometry {self}.")

    @cached_property
    def input_index(self) -> np.ndarray:
        """``[in_cts, slots]`` indices into the queries' ``x'`` (``-1`` for a zero slot)."""
        if self.queries > 1:
            return _tile(self._single_input(self.region), self.region, self.queries, self.cols, self.slots)
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
            return _tile(self._single_output(self.region), self.region, self.queries, self.rows, self.slots)
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


MAX_FEATURES = 1 << 22
MAX_BLOCK_K = 64


def _plausible(rows: int, cols: int, slots: int) -> bool:
    """Bounds that keep a hostile plan from making the enclave or server allocate without limit."""
    power_of_two = 0 < slots <= 16384 and slots & (slots - 1) == 0
    return 0 < rows <= MAX_FEATURES and 0 < cols <= MAX_FEATURES and power_of_two


def _best_split(k: int, in_cts: int, out_cts: int) -> tuple[int, int]:
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


def estimate_parts(
    layout: Layout, encrypted_weights: bool, costs: UnitCosts = UnitCosts(), batch: int = 1
) -> tuple[float, float]:
    """Predicted server and enclave milliseconds per query of a batch (enclave time with its slowdown)."""
    c = layout.counts()
    multiply = costs.multiply_cipher if encrypted_weights else costs.multiply_plain
    server = (
        c["baby_rotations"] * costs.rotation
        + c["giant_rotations"] * costs.rotation_rescaled
        + c["rescales"] * costs.rescale
        + c["multiplications"] * (multiply + costs.add)
        + (c["giant_rotations"] * costs.relinearize_rescaled if encrypted_weights else 0.0)
    )
    enclave = costs.enclave_factor * (layout.out_cts * costs.enclave_decrypt + layout.in_cts * costs.enclave_encrypt)
    groups = layout.groups(batch) / batch
    return server * groups, enclave * groups


def estimate_ms(layout: Layout, encrypted_weights: bool, costs: UnitCosts = UnitCosts(), batch: int = 1) -> float:
    """The cost model: server time plus enclave time (weighted by its slowdown), per query of a batch."""
    return sum(estimate_parts(layout, encrypted_weights, costs, batch))


def _cheapest(candidates: list[Layout | None], encrypted_weights: bool, costs: UnitCosts, batch: int) -> Layout:
    usable = [c for c in candidates if c is not None]
    return min(usable, key=lambda layout: estimate_ms(layout, encrypted_weights, costs, batch))


def choose_geometry(
    rows: int, cols: int, slots: int, encrypted_weights: bool, costs: UnitCosts = UnitCosts(), batch: int = 1
) -> LinearGeometry:
    """The cheapest cyclic layout for a ``rows x cols`` matrix.

    With ``batch > 1`` (throughput mode) a layout may hold several queries per
    ciphertext, each in a region just large enough for its rows.
    """
    if rows < 1 or cols < 1:
        raise PlanError(f"An affine layer needs at least one row and one column, got {rows}x{cols}.")
    in_cts = math.ceil(cols / slots)
    chunk = math.ceil(cols / in_cts)
    candidates: list[Layout | None] = []
    for k in range(1, chunk + 1):
        period = math.ceil(chunk / k) * k
        if period > slots:
            continue
        single = LinearGeometry(rows, cols, slots, k, period, chunk, 1, k)
        if single.blocks < 1:
            continue
        shapes = [(1, single.out_cts)]
        packed = LinearGeometry(rows, cols, slots, k, period, chunk, 1, k, 2)
        if batch > 1 and in_cts == 1 and 2 * packed.region <= slots:
            shapes.append((min(batch, slots // packed.region), 1))
        for queries, out_cts in shapes:
            baby, giant = _best_split(k, in_cts, out_cts)
            candidates.append(LinearGeometry(rows, cols, slots, k, period, chunk, baby, giant, queries))
    if not candidates:
        raise PlanError(f"No slot layout fits a {rows}x{cols} layer in {slots} slots.")
    return _cheapest(candidates, encrypted_weights, costs, batch)


def unused_layout(rows: int, cols: int, slots: int) -> LinearGeometry:
    """A minimal valid layout for a stage that is not evaluated under CKKS (its shape is what matters)."""
    in_cts = math.ceil(cols / slots)
    chunk = math.ceil(cols / in_cts)
    return LinearGeometry(rows, cols, slots, 1, chunk, chunk, 1, 1)


def choose_layout(
    support: np.ndarray, slots: int, encrypted_weights: bool, costs: UnitCosts = UnitCosts(), batch: int = 1
) -> Layout:
    """The cheapest layout for a layer whose structural nonzeros are ``support``, for batches of ``batch``.

    Candidates hold one row per slot, or (for two rows or more) pair rows in
    the slots' real and imaginary parts (:class:`PairedRows`).
    """
    candidates = _one_row_per_slot(support, slots, encrypted_weights, costs, batch)
    if support.shape[0] >= 2:
        bases = _one_row_per_slot(paired_support(support), slots, encrypted_weights, costs, 1)
        candidates += [PairedRows(base, support.shape[0]) for base in bases if base is not None and base.queries == 1]
    return _cheapest(candidates, encrypted_weights, costs, batch)


def _one_row_per_slot(
    support: np.ndarray, slots: int, encrypted_weights: bool, costs: UnitCosts, batch: int
) -> list[Layout | None]:
    rows, cols = support.shape
    cyclic = choose_geometry(rows, cols, slots, encrypted_weights, costs, batch)
    if support.all() or not support.any():
        return [cyclic]
    deepest = max(len(g[1]) for g in support_groups(support))
    builders = [lambda q: GroupedLayout.from_support(support, slots, q)] + [
        lambda q, k=k: GroupedLayout.block_cyclic(support, slots, k, q) for k in range(2, min(deepest, MAX_BLOCK_K) + 1)
    ]
    candidates: list[Layout | None] = [cyclic]
    for build in builders:
        candidates.append(build(1))
        # The most queries per ciphertext lane that fit, halving from what the batch can fill.
        candidates.append(next((c for q in _halvings(math.ceil(batch / LANES)) if (c := build(q)) is not None), None))
    return candidates


def _halvings(batch: int) -> list[int]:
    out, q = [], batch
    while q > 1:
        out.append(q)
        q //= 2
    return out


Group = tuple[np.ndarray, list[int]]


def support_groups(support: np.ndarray) -> list[Group]:
    """Rows that read exactly the same inputs, as ``(input columns, rows)``, in first-row order.

    Rows that read nothing (a convolution's outputs that see only padding) are
    left out: their output is the bias alone, which the enclave adds.
    """
    groups: dict[bytes, Group] = {}
    for r in range(support.shape[0]):
        if not support[r].any():
            continue
        key = np.packbits(support[r]).tobytes()
        groups.setdefault(key, (np.flatnonzero(support[r]), []))[1].append(r)
    return list(groups.values())


@dataclass(frozen=True, eq=False)
class GroupedLayout(Layout):
    """Layouts for sparse layers (convolutions, pooling, batch-norm) built from groups of rows.

    Rows that read the same inputs (a convolution's output channels at one
    position) form a group. Two constructions share this class:

    - :meth:`from_support`, a generalised im2col: an input ciphertext holds each
      group's inputs once (replicated ``copies`` times), and output ciphertext
      ``t`` pairs copy ``a`` with the group's row ``t * copies + a``. Every
      product sits in its own slot: no rotation, one multiplication per output.
    - :meth:`block_cyclic`: each block holds one group's inputs cyclically with
      period ``p`` (plus ``k - 1`` slots of wrap-around, so rotations never read
      the next block) and serves ``k`` of its rows as in the dense cyclic
      layout: ``k - 1`` rotations buy ``k`` times fewer output ciphertexts, so
      the enclave decrypts less.

    Either way the enclave adds each row's partial sums after decrypting. The
    maps are stored explicitly in the plan; ``output_chunk[o]`` is the one input
    ciphertext output ``o`` reads.
    """

    rows: int
    cols: int
    slots: int
    input_index: np.ndarray
    output_row: np.ndarray
    output_chunk: np.ndarray
    k: int = 1
    baby: int = 1
    giant: int = 1
    queries: int = 1

    kind = "grouped"

    def linked(self, o: int, i: int) -> bool:
        return int(self.output_chunk[o]) == i

    @classmethod
    def from_support(cls, support: np.ndarray, slots: int, queries: int = 1) -> GroupedLayout | None:
        """The im2col-like layout; ``None`` if a group has no inputs or more than the slots.

        With ``queries > 1`` each query gets its own region of one copy, which
        needs every group in one region of at most ``slots / queries`` slots.
        """
        rows, cols = support.shape
        groups = support_groups(support)
        chunks = _pack(groups, [len(g[0]) for g in groups], slots // queries)
        if chunks is None or (queries > 1 and len(chunks) > 1):
            return None
        inputs, outputs, owner = [], [], []
        for i, chunk in enumerate(chunks):
            width = sum(len(g[0]) for g in chunk)
            depth = max(len(g[1]) for g in chunk)
            copies = 1 if queries > 1 else max(1, min(depth, slots // width))
            index = np.full(slots, -1, dtype=np.int64)
            segment = np.concatenate([g[0] for g in chunk])
            for a in range(copies):
                index[a * width : (a + 1) * width] = segment
            inputs.append(index)
            for t in range(math.ceil(depth / copies)):
                row_map = np.full(slots, -1, dtype=np.int64)
                for a in range(copies):
                    offset = a * width
                    for cols_g, rows_g in chunk:
                        if t * copies + a < len(rows_g):
                            row_map[offset : offset + len(cols_g)] = rows_g[t * copies + a]
                        offset += len(cols_g)
                outputs.append(row_map)
                owner.append(i)
        index_map, row_map = np.stack(inputs), np.stack(outputs)
        if queries > 1:
            width = sum(len(g[0]) for g in chunks[0])
            index_map = _tile(index_map, width, queries, cols, slots)
            row_map = _tile(row_map, width, queries, rows, slots)
        return cls(rows, cols, slots, index_map, row_map, np.asarray(owner, dtype=np.int64), queries=queries)

    @classmethod
    def block_cyclic(cls, support: np.ndarray, slots: int, k: int, queries: int = 1) -> GroupedLayout | None:
        """Blocks of ``k`` rows of one group, cyclic within the block; ``None`` if a block exceeds the slots."""
        rows, cols = support.shape
        blocks = [(g[0], g[1][j : j + k]) for g in support_groups(support) for j in range(0, len(g[1]), k)]
        periods = [math.ceil(len(c) / k) * k for c, _ in blocks]
        sizes = [p + k - 1 for p in periods]
        chunks = _pack(list(zip(blocks, periods)), sizes, slots // queries)
        if chunks is None or (queries > 1 and len(chunks) > 1):
            return None
        inputs, outputs = [], []
        for chunk in chunks:
            index = np.full(slots, -1, dtype=np.int64)
            row_map = np.full(slots, -1, dtype=np.int64)
            offset = 0
            for (cols_b, rows_b), period in chunk:
                u = np.arange(period + k - 1)
                local = u % period
                within = local < len(cols_b)
                index[offset + u[within]] = cols_b[local[within]]
                serving = (u < period) & (u % k < len(rows_b))
                row_map[offset + u[serving]] = np.asarray(rows_b)[u[serving] % k]
                offset += period + k - 1
            inputs.append(index)
            outputs.append(row_map)
        n = len(chunks)
        baby, giant = _best_split(k, n, n)
        index_map, row_map = np.stack(inputs), np.stack(outputs)
        if queries > 1:
            index_map = _tile(index_map, sum(sizes), queries, cols, slots)
            row_map = _tile(row_map, sum(sizes), queries, rows, slots)
        return cls(rows, cols, slots, index_map, row_map, np.arange(n, dtype=np.int64), k, baby, giant, queries)

    def to_wire(self) -> dict:
        return {
            "kind": self.kind,
            "rows": self.rows,
            "cols": self.cols,
            "slots": self.slots,
            "input_index": self.input_index.astype("<i4").tobytes(),
            "output_row": self.output_row.astype("<i4").tobytes(),
            "output_chunk": self.output_chunk.astype("<i4").tobytes(),
            "k": self.k,
            "baby": self.baby,
            "giant": self.giant,
            "queries": self.queries,
        }

    @classmethod
    def from_wire(cls, data: dict) -> GroupedLayout:
        try:
            rows, cols, slots = (data[k] for k in ("rows", "cols", "slots"))
            if not all(type(v) is int for v in (rows, cols, slots)) or not _plausible(rows, cols, slots):
                raise ValueError
            maps = [np.frombuffer(data[k], dtype="<i4").astype(np.int64) for k in ("input_index", "output_row")]
            chunk = np.frombuffer(data["output_chunk"], dtype="<i4").astype(np.int64)
            steps = [data[k] for k in ("k", "baby", "giant", "queries")]
            if not all(type(v) is int for v in steps):
                raise ValueError
            layout = cls(rows, cols, slots, maps[0].reshape(-1, slots), maps[1].reshape(-1, slots), chunk, *steps)
        except (KeyError, TypeError, ValueError):
            raise PlanError("A grouped layout is malformed.") from None
        layout.validate()
        return layout

    def validate(self) -> None:
        """Refuse maps that point outside the layer or link to missing ciphertexts."""
        ok = (
            _plausible(self.rows, self.cols, self.slots)
            and self.input_index.shape[1] == self.output_row.shape[1] == self.slots
            and len(self.output_chunk) == self.out_cts
            and 1 <= self.queries <= self.slots
            and self.input_index.min() >= -1
            and self.input_index.max() < self.queries * self.cols
            and self.output_row.min() >= -1
            and self.output_row.max() < self.queries * self.rows
            and (self.output_chunk >= 0).all()
            and (self.output_chunk < self.in_cts).all()
            and 0 < self.k <= self.slots
            and self.baby >= 1
            and self.giant >= 1
            and self.baby * self.giant >= self.k
        )
        if not ok:
            raise PlanError(f"Inconsistent grouped layout for a {self.rows}x{self.cols} layer.")


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
    def from_wire(cls, data: dict) -> PairedRows:
        base_wire, rows = data.get("base"), data.get("rows")
        if not isinstance(base_wire, dict) or base_wire.get("kind") == cls.kind or type(rows) is not int:
            raise PlanError("A paired-rows layout needs an integer row count and a base layout of another kind.")
        base = layout_from_wire(base_wire)
        if base.queries != 1 or not base.rows < rows <= 2 * base.rows:
            raise PlanError(f"A paired-rows layout of {rows} rows cannot pair a base of {base.rows} rows.")
        return cls(base, rows)


def paired_support(support: np.ndarray) -> np.ndarray:
    """Row ``r``'s support joined with row ``r + half``'s: what a :class:`PairedRows` base must cover."""
    half = math.ceil(support.shape[0] / 2)
    paired = support[:half].copy()
    paired[: support.shape[0] - half] |= support[half:]
    return paired


def _tile(single: np.ndarray, region: int, queries: int, width: int, slots: int) -> np.ndarray:
    """Repeat one query's maps ``queries`` times, ``region`` slots apart, indexing query ``q``'s values."""
    out = np.full((single.shape[0], slots), -1, dtype=np.int64)
    for q in range(queries):
        part = single[:, :region]
        out[:, q * region : (q + 1) * region] = np.where(part >= 0, part + q * width, -1)
    return out


def _pack(items: list, widths: list[int], slots: int) -> list[list] | None:
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


def layout_from_wire(data: dict) -> Layout:
    """A layout from the plan, of whichever kind it names."""
    kinds = {"cyclic": LinearGeometry, "grouped": GroupedLayout, "paired": PairedRows}
    kind = data.get("kind", "cyclic") if isinstance(data, dict) else None
    if kind not in kinds:
        raise PlanError(f"Unknown layout kind {kind!r}; expected one of {', '.join(kinds)}.")
    return kinds[kind].from_wire(data)
