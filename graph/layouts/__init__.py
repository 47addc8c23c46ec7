"""Slot layouts of an ``he`` layer, one module per kind, and the registry that reads any of them from a plan.

:mod:`.base` says what every layout provides; :mod:`.cyclic` (dense layers),
:mod:`.grouped` (sparse layers such as convolutions) and :mod:`.paired` (two
rows per complex slot) are the kinds. ``heclave.plan.layouts`` chooses among
them with the cost model.
"""

from __future__ import annotations

from heclave.protocol.errors import PlanError

from .base import Layout
from .cyclic import CyclicLayout
from .grouped import GroupedLayout
from .paired import PairedRows

KINDS: dict[str, type[Layout]] = {"cyclic": CyclicLayout, "grouped": GroupedLayout, "paired": PairedRows}


def layout_from_wire(data: dict) -> Layout:
    """A layout from the plan, of whichever kind it names."""
    kind = data.get("kind", "cyclic") if isinstance(data, dict) else None
    if kind not in KINDS:
        raise PlanError(f"Unknown layout kind {kind!r}; expected one of {', '.join(KINDS)}.")
    if KINDS[kind] is not PairedRows:
        return KINDS[kind].from_wire(data)
    base = data.get("base")
    if not isinstance(base, dict) or base.get("kind") == PairedRows.kind:
        raise PlanError("A paired-rows layout needs an integer row count and a base layout of another kind.")
    return PairedRows.from_wire(data, layout_from_wire(base))
