"""Turn an imported model into a deployment plan: a slot layout for every affine layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from heclave.arith.blinding import weight_scale
from heclave.graph.model import ModelGraph, Stage
from heclave.graph.params import CkksParams
from heclave.graph.placement import Placement, WeightForm
from heclave.graph.release import ReleasePolicy
from heclave.plan.costs import UnitCosts
from heclave.protocol.errors import PlanError

from .importer import ImportedModel, from_pytorch
from .layouts import choose_layout, unused_layout


@dataclass
class Plan:
    """A deployable graph and, kept apart, the model owner's secret weights for each stage.

    ``weights[i]`` is ``[W | b]`` and ``supports[i]`` its structural nonzeros, whatever the placement.
    """

    graph: ModelGraph
    weights: list[np.ndarray]
    supports: list[np.ndarray]

    def summary(self) -> list[dict]:
        """Per stage: shape, layout and the server's operation counts (public metadata)."""
        rows = []
        for i, stage in enumerate(self.graph.stages):
            g = stage.layout
            he = stage.placement is Placement.HE
            rows.append(
                {
                    "stage": i,
                    "reads": "input" if stage.source == 0 else f"stage {stage.source - 1}",
                    "shape": f"{g.rows}x{stage.in_features}",
                    "placement": stage.placement.value,
                    "layout": g.describe() if he else "-",
                    **(g.counts() if he else {}),
                    "enclave": "+".join(op.kind.value for op in stage.ops) or "release",
                }
            )
        return rows


def plan_model(
    imported: ImportedModel,
    weight_form: WeightForm | str = WeightForm.ENCRYPTED,
    release: ReleasePolicy = ReleasePolicy(),
    params: CkksParams = CkksParams(),
    costs: UnitCosts = UnitCosts(),
    name: str = "model",
    batch: int = 1,
    placements: Sequence[Placement | str] | None = None,
) -> Plan:
    """Choose every layer's slot layout for the given weight form.

    ``batch`` is the number of queries a request is expected to carry: above one,
    layouts that pack several queries into a ciphertext become candidates
    (throughput mode); the default plans for the latency of single queries.
    ``placements`` gives each stage's placement (default: all ``he``).
    """
    if batch < 1:
        raise PlanError(f"The batch size must be at least 1, got {batch}.")
    form = WeightForm.parse(weight_form) if isinstance(weight_form, str) else weight_form
    chosen = (
        [Placement.HE] * len(imported.stages)
        if placements is None
        else [Placement.parse(p) if isinstance(p, str) else p for p in placements]
    )
    if len(chosen) != len(imported.stages):
        raise PlanError(f"The model has {len(imported.stages)} stages but {len(chosen)} placements were given.")
    stages, weights, supports = [], [], []
    for i, ((affine, ops), placement) in enumerate(zip(imported.stages, chosen)):
        w = affine.augmented
        if placement is Placement.HE:
            layout = choose_layout(affine.weight_support, params.slots, form is WeightForm.ENCRYPTED, costs, batch)
        else:
            layout = unused_layout(w.shape[0], w.shape[1], params.slots)
        bits = weight_scale(w) if placement is Placement.BLINDED else 0
        stages.append(Stage(layout, affine.out_shape, tuple(ops), placement, bits, imported.source(i)))
        weights.append(w)
        supports.append(affine.support)
    graph = ModelGraph(imported.input_shape, tuple(stages), params, form, release, name)
    return Plan(graph, weights, supports)


def plan_pytorch(model: nn.Module, input_shape: tuple[int, ...], **options) -> Plan:
    """Import and plan a torch model in one call; options as for :func:`plan_model`."""
    return plan_model(from_pytorch(model, input_shape), **options)
