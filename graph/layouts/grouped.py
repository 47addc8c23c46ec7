"""Layouts for sparse layers (convolutions, pooling, batch-norm), built from groups of rows that read the same
inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from heclave.protocol.errors import PlanError

from .base import Layout, best_split, pack, plausible, tile

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
        chunks = pack(groups, [len(g[0]) for g in groups], slots // queries)
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
            index_map = tile(index_map, width, queries, cols, slots)
            row_map = tile(row_map, width, queries, rows, slots)
        return cls(rows, cols, slots, index_map, row_map, np.asarray(owner, dtype=np.int64), queries=queries)

    @classmethod
    def block_cyclic(cls, support: np.ndarray, slots: int, k: int, queries: int = 1) -> GroupedLayout | None:
        """Blocks of ``k`` rows of one group, cyclic within the block; ``None`` if a block exceeds the slots."""
        rows, cols = support.shape
        blocks = [(g[0], g[1][j : j + k]) for g in support_groups(support) for j in range(0, len(g[1]), k)]
        periods = [math.ceil(len(c) / k) * k for c, _ in blocks]
        sizes = [p + k - 1 for p in periods]
        chunks = pack(list(zip(blocks, periods)), sizes, slots // queries)
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
        baby, giant = best_split(k, n, n)
        index_map, row_map = np.stack(inputs), np.stack(outputs)
        if queries > 1:
            index_map = tile(index_map, sum(sizes), queries, cols, slots)
            row_map = tile(row_map, sum(sizes), queries, rows, slots)
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
            if not all(type(v) is int for v in (rows, cols, slots)) or not plausible(rows, cols, slots):
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
            plausible(self.rows, self.cols, self.slots)
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
