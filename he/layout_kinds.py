"""Every kind of slot layout, by the name a plan gives it."""

from __future__ import annotations

from heclave.protocol.errors import PlanError

from .cyclic import LinearGeometry
from .grouped import GroupedLayout
from .layout import Layout
from .paired import PairedRows

KINDS: dict[str, type[Layout]] = {"cyclic": LinearGeometry, "grouped": GroupedLayout, "paired": PairedRows}


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
