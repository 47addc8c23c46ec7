"""What the untrusted server can see or change under a plan: the part of a placement's protection given up.

The enclave verifies every ``he`` and ``blinded`` layer the server computes
(``tee.verify``); a ``plain`` run is the server's word, so the plan says so.
"""

from __future__ import annotations

from heclave.graph.model import ModelGraph
from heclave.graph.placement import Placement, WeightForm


def exposure(graph: ModelGraph) -> list[str]:
    """Plain-language items the server learns or controls beyond shapes, sizes and timings (empty: nothing more)."""
    stages = graph.stages
    seen: list[str] = []
    for i, stage in enumerate(stages):
        where = f"layer {i + 1} ({stage.layout.rows}x{stage.in_features})"
        if stage.placement is Placement.PLAIN:
            seen.append("the input" if stage.source == 0 else f"the activation entering {where}")
            seen.append(f"the weights of {where}")
            seen.append(f"the result of {where}, which no one checks: the server can change it")
            if i == len(stages) - 1:
                seen.append("the output (before release)")
            elif graph.plain_run_end(i) == i:
                seen.append(f"the activation leaving {where}")
        elif stage.placement is Placement.BLINDED:
            seen.append(f"the weights of {where} (quantized)")
        elif stage.placement is Placement.HE and graph.weight_form is WeightForm.PLAIN:
            seen.append(f"the weights of {where} (not its bias, which only the enclave holds)")
    return seen
