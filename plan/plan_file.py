"""The plan file: the placements ``heclave plan`` chose, which ``heclave model-owner deploy --plan`` deploys.

A JSON object with a ``format`` number. It is read back field by field: a file
of another format, or one whose placements, weight form or batch are not what
deploying needs, is refused with the field's name instead of failing halfway
through a deployment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from heclave.graph.placement import Placement, WeightForm
from heclave.protocol.errors import PlanError
from heclave.protocol.storage import PUBLIC_MODE, write_atomic

PLAN_FILE_FORMAT = 1


@dataclass(frozen=True)
class PlanFile:
    """What was planned (``placements``, ``weights``, ``batch``), for which model, and what it predicts."""

    model: str
    input_shape: list[int]
    weights: str
    batch: int
    placements: list[str]
    protect: list[str]
    predicted_latency_ms: float
    predicted_enclave_share: float
    exposes: list[str]
    cut_ssim: dict[int, float] | None = None

    def to_json(self) -> dict:
        return {"format": PLAN_FILE_FORMAT, **asdict(self)}

    def write(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), indent=2).encode(), PUBLIC_MODE)

    @classmethod
    def read(cls, path: Path) -> PlanFile:
        """The plan file at ``path``, or a :class:`PlanError` naming what is wrong with it."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"Cannot read the plan file {path} ({type(exc).__name__}).") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FILE_FORMAT:
            raise PlanError(
                f"{path} is not a heclave plan file of format {PLAN_FILE_FORMAT}; make one with 'heclave plan'."
            )
        placements, weights, batch = data.get("placements"), data.get("weights"), data.get("batch")
        valid = {p.value for p in Placement}
        if not isinstance(placements, list) or not placements or not set(placements) <= valid:
            raise PlanError(f"{path}: 'placements' must be a list of {', '.join(sorted(valid))}.")
        if weights not in {f.value for f in WeightForm}:
            raise PlanError(f"{path}: 'weights' must be one of {', '.join(f.value for f in WeightForm)}.")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise PlanError(f"{path}: 'batch' must be a positive integer.")
        fields = {name: data.get(name) for name in cls.__dataclass_fields__}
        return cls(**fields)
