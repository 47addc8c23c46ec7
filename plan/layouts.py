"""Choosing each layer's slot layout: every candidate of every kind, the cheapest by the cost model."""

from __future__ import annotations

import math

import numpy as np

from heclave.graph.layouts.base import LANES, Layout, best_split
from heclave.graph.layouts.cyclic import CyclicLayout
from heclave.graph.layouts.grouped import GroupedLayout, support_groups
from heclave.graph.layouts.paired import PairedRows, paired_support
from heclave.plan.costs import UnitCosts, estimate_ms
from heclave.protocol.errors import PlanError

MAX_BLOCK_K = 64


def choose_cyclic(
    rows: int, cols: int, slots: int, encrypted_weights: bool, costs: UnitCosts = UnitCosts(), batch: int = 1
) -> CyclicLayout:
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
        single = CyclicLayout(rows, cols, slots, k, period, chunk, 1, k)
        if single.blocks < 1:
            continue
        shapes = [(1, single.out_cts)]
        packed = CyclicLayout(rows, cols, slots, k, period, chunk, 1, k, 2)
        if batch > 1 and in_cts == 1 and 2 * packed.region <= slots:
            shapes.append((min(batch, slots // packed.region), 1))
        for queries, out_cts in shapes:
            baby, giant = best_split(k, in_cts, out_cts)
            candidates.append(CyclicLayout(rows, cols, slots, k, period, chunk, baby, giant, queries))
    if not candidates:
        raise PlanError(f"No slot layout fits a {rows}x{cols} layer in {slots} slots.")
    return _cheapest(candidates, encrypted_weights, costs, batch)


def unused_layout(rows: int, cols: int, slots: int) -> CyclicLayout:
    """A minimal valid layout for a stage that is not evaluated under CKKS (its shape is what matters)."""
    in_cts = math.ceil(cols / slots)
    chunk = math.ceil(cols / in_cts)
    return CyclicLayout(rows, cols, slots, 1, chunk, chunk, 1, 1)


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
    cyclic = choose_cyclic(rows, cols, slots, encrypted_weights, costs, batch)
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


def _cheapest(candidates: list[Layout | None], encrypted_weights: bool, costs: UnitCosts, batch: int) -> Layout:
    usable = [c for c in candidates if c is not None]
    return min(usable, key=lambda layout: estimate_ms(layout, encrypted_weights, costs, batch))
