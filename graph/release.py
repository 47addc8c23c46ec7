"""What the enclave releases to the data owner at the end of an inference."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from heclave.protocol.errors import PlanError


class ReleaseMode(str, Enum):
    """What the enclave releases to the data owner."""

    LOGITS = "logits"
    TOPK = "topk"
    LABEL = "label"


@dataclass(frozen=True)
class ReleasePolicy:
    """The final output's form: logits rounded to ``decimals``, the top ``k`` labels, or the label."""

    mode: ReleaseMode = ReleaseMode.LOGITS
    decimals: int = 4
    k: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "decimals": self.decimals, "k": self.k}

    @classmethod
    def from_wire(cls, d: dict) -> ReleasePolicy:
        try:
            mode = ReleaseMode(d["mode"])
        except (KeyError, ValueError, TypeError):
            valid = ", ".join(m.value for m in ReleaseMode)
            raise PlanError(f"Unknown release mode; use one of: {valid}.") from None
        decimals, k = d.get("decimals", 4), d.get("k", 1)
        if not isinstance(decimals, int) or not 0 <= decimals <= 8 or not isinstance(k, int) or k < 1:
            raise PlanError("Release decimals must be 0..8 and k at least 1.")
        return cls(mode, decimals, k)
