"""Turn an imported model into a deployment plan: a slot layout for every affine layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from he.context import CkksParams
from he.graph import ModelGraph, ReleasePolicy, Stage
from he.layout import UnitCosts, choose_layout
from he.linear import WeightForm
from protocol.errors import PlanError

from .importer import ImportedModel, from_pytorch


@dataclass
class Plan:
    """A deployable graph and, kept apart, the model owner's secret weights for each stage."""

    graph: ModelGraph
    weights: list[np.ndarray]

    def summary(self) -> list[dict]:
        """Per stage: shape, layout and the server's operation counts (public metadata)."""
        rows = []
        for i, stage in enumerate(self.graph.stages):
            g = stage.geometry
            rows.append(
                {
                    "stage": i,
                    "shape": f"{g.rows}x{g.cols - 1}",
                    "layout": g.describe(),
                    **g.counts(),
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
) -> Plan:
    """Choose every layer's slot layout for the given weight form.

    ``batch`` is the number of queries a request is expected to carry: above one,
    layouts that pack several queries into a ciphertext become candidates
    (throughput mode); the default plans for the latency of single queries.
    """
    if batch < 1:
        raise PlanError(f"The batch size must be at least 1, got {batch}.")
    form = WeightForm.parse(weight_form) if isinstance(weight_form, str) else weight_form
    stages, weights = [], []
    for affine, ops in imported.stages:
        w = affine.augmented
        layout = choose_layout(affine.support, params.slots, form is WeightForm.ENCRYPTED, costs, batch)
        stages.append(Stage(layout, affine.out_shape, tuple(ops)))
        weights.append(w)
    graph = ModelGraph(imported.input_shape, tuple(stages), params, form, release, name)
    return Plan(graph, weights)


def plan_pytorch(model: nn.Module, input_shape: tuple[int, ...], **options) -> Plan:
    """Import and plan a torch model in one call; options as for :func:`plan_model`."""
    return plan_model(from_pytorch(model, input_shape), **options)
