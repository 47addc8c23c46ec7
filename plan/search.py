"""The cheapest placement of every stage that meets the protections the model owner asks for."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from heclave.graph.ops import BINARY
from heclave.graph.placement import Placement, WeightForm
from heclave.plan.costs import estimate_parts
from heclave.protocol.errors import PlanError

from .calibration import Calibration
from .importer import ImportedModel
from .layouts import choose_layout

PROTECTIONS = ("input", "weights")
MAX_EXHAUSTIVE_STAGES = 7


@dataclass(frozen=True)
class Prediction:
    """A candidate's predicted cost per query; enclave time includes the SGX slowdown factor."""

    placements: tuple[Placement, ...]
    server_ms: float
    enclave_ms: float

    @property
    def latency_ms(self) -> float:
        return self.server_ms + self.enclave_ms

    @property
    def enclave_share(self) -> float:
        return self.enclave_ms / max(self.latency_ms, 1e-12)


def stage_costs(
    imported: ImportedModel, calibration: Calibration, form: WeightForm, batch: int = 1, slots: int = 4096
) -> list[dict[Placement, tuple[float, float]]]:
    """(server ms, enclave ms) of every stage under every placement."""
    he, plain = calibration.he, calibration.plaintext
    costs = []
    for affine, _ in imported.stages:
        nnz = int(affine.support.sum())
        layout = choose_layout(affine.weight_support, slots, form is WeightForm.ENCRYPTED, he, batch)
        mac, field = nnz * plain.sparse_mac_ns / 1e6, nnz * plain.field_mac_ns / 1e6
        costs.append(
            {
                Placement.HE: estimate_parts(layout, form is WeightForm.ENCRYPTED, he, batch),
                Placement.ENCLAVE: (0.0, he.enclave_factor * mac),
                Placement.BLINDED: (field, he.enclave_factor * field),
                Placement.PLAIN: (mac, 0.0),
            }
        )
    return costs


def allowed(
    reads: int, protect: set[str], form: WeightForm, cut_ssim: dict[int, float] | None, threshold: float | None
) -> list[Placement]:
    """The placements a stage reading value ``reads`` may take under the protections asked for."""
    options = []
    for placement in Placement:
        if "weights" in protect and (
            placement in (Placement.PLAIN, Placement.BLINDED)
            or (placement is Placement.HE and form is WeightForm.PLAIN)
        ):
            continue
        if "input" in protect and placement is Placement.PLAIN:
            # A plain stage shows the server the activation entering it: the cut at value ``reads``.
            if cut_ssim is None or threshold is None or cut_ssim.get(reads, 1.0) >= threshold:
                continue
        options.append(placement)
    return options


def cheapest(
    imported: ImportedModel,
    protect: set[str],
    calibration: Calibration,
    form: WeightForm,
    enclave_budget: float,
    cut_ssim: dict[int, float] | None = None,
    threshold: float | None = None,
    batch: int = 1,
) -> Prediction:
    """The lowest predicted latency among the plans that meet ``protect`` and the enclave budget."""
    unknown = protect - set(PROTECTIONS)
    if unknown:
        raise PlanError(f"Unknown protections {sorted(unknown)}; choose from {', '.join(PROTECTIONS)}.")
    if len(imported.stages) > MAX_EXHAUSTIVE_STAGES:
        raise PlanError(
            f"Planning searches every placement of up to {MAX_EXHAUSTIVE_STAGES} stages; "
            f"this model has {len(imported.stages)}. Give placements explicitly."
        )
    costs = stage_costs(imported, calibration, form, batch)
    # A plain stage shows the server the value it reads: the cut at that value.
    choices = [allowed(imported.source(i), protect, form, cut_ssim, threshold) for i in range(len(costs))]
    for i, (_, ops) in enumerate(imported.stages):
        if any(op.kind in BINARY for op in ops):  # the server holds none of the values such steps combine
            choices[i] = [p for p in choices[i] if p is not Placement.PLAIN]
    best: Prediction | None = None
    closest_share = 1.0
    for combo in itertools.product(*choices):
        server = sum(costs[i][p][0] for i, p in enumerate(combo))
        enclave = sum(costs[i][p][1] for i, p in enumerate(combo))
        candidate = Prediction(tuple(combo), server, enclave)
        closest_share = min(closest_share, candidate.enclave_share)
        if candidate.enclave_share <= enclave_budget and (best is None or candidate.latency_ms < best.latency_ms):
            best = candidate
    if best is None:
        raise PlanError(
            f"No plan protects {', '.join(sorted(protect)) or 'nothing'} within an enclave share of "
            f"{enclave_budget:.2f}: the lowest possible is {closest_share:.2f}. Raise --enclave-budget, or "
            "protect less."
        )
    return best
