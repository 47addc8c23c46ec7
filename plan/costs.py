"""The cost model: predicted server and enclave milliseconds of an encrypted layer in a given slot layout.

It chooses layouts and placements only (``plan.layouts``, ``plan.search``,
calibrated by ``plan.calibration``), so it lives with the planner, outside the
enclave's measured code.
"""

from __future__ import annotations

from dataclasses import dataclass

from heclave.graph.layouts.base import Layout

# What a millisecond of enclave work costs in server milliseconds: about 2 for SGX's overheads (which
# cannot be measured without SGX), times 2 because one enclave serves every lane of a server (two on
# this project's 2-core machine), while the server's work spreads over its lanes.
ENCLAVE_FACTOR = 4.0


@dataclass(frozen=True)
class UnitCosts:
    """Milliseconds per operation, used to choose a layout; ``heclave calibrate`` measures them on a machine."""

    rotation: float = 1.3
    rotation_rescaled: float = 0.67
    rescale: float = 0.36
    multiply_plain: float = 0.11
    multiply_cipher: float = 0.25
    relinearize_rescaled: float = 0.67
    add: float = 0.04
    enclave_decrypt: float = 0.28
    enclave_encrypt: float = 0.82
    enclave_factor: float = ENCLAVE_FACTOR


def estimate_parts(
    layout: Layout, encrypted_weights: bool, costs: UnitCosts = UnitCosts(), batch: int = 1
) -> tuple[float, float]:
    """Predicted server and enclave milliseconds per query of a batch (enclave time with its slowdown)."""
    c = layout.counts()
    multiply = costs.multiply_cipher if encrypted_weights else costs.multiply_plain
    server = (
        c["baby_rotations"] * costs.rotation
        + c["giant_rotations"] * costs.rotation_rescaled
        + c["rescales"] * costs.rescale
        + c["multiplications"] * (multiply + costs.add)
        + (c["giant_rotations"] * costs.relinearize_rescaled if encrypted_weights else 0.0)
    )
    enclave = costs.enclave_factor * (layout.out_cts * costs.enclave_decrypt + layout.in_cts * costs.enclave_encrypt)
    groups = layout.groups(batch) / batch
    return server * groups, enclave * groups


def estimate_ms(layout: Layout, encrypted_weights: bool, costs: UnitCosts = UnitCosts(), batch: int = 1) -> float:
    """The cost model: server time plus enclave time (weighted by its slowdown), per query of a batch."""
    return sum(estimate_parts(layout, encrypted_weights, costs, batch))
