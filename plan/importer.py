"""Import a torch model as heclave's stages: exact affine maps, exact enclave steps, and the values they read.

The model is traced with ``torch.fx`` (a public API). Its operations are taken
one at a time by ``plan.torch_steps`` (which are affine, which are exact
steps, which are refused) and its dataflow by ``plan.graph_walk``: runs of
affine operations between values compose into stages, residual additions,
gating products and concatenations become enclave steps, and each stage names
the value it reads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn as nn

from heclave.graph.ops import EnclaveOp
from heclave.protocol.errors import PlanError

from .activation_import import NONLINEAR_MODULES
from .graph_walk import walk
from .torch_steps import AFFINE_MODULES, AffineMap, trace

__all__ = ["AffineMap", "ImportedModel", "from_pytorch"]


@dataclass
class ImportedModel:
    """The (affine map, enclave steps) stages imported from torch, and the value each reads (``sources[i]``:
    0 the input, ``j + 1`` stage ``j``'s result; the previous stage's where not given)."""

    input_shape: tuple[int, ...]
    stages: list[tuple[AffineMap, list[EnclaveOp]]]
    sources: list[int] = field(default_factory=list)

    def source(self, index: int) -> int:
        return self.sources[index] if self.sources else index


def from_pytorch(model: nn.Module, input_shape: tuple[int, ...]) -> ImportedModel:
    """Import ``model`` (evaluated as in ``model.eval()``) for inputs of shape ``input_shape`` (no batch axis)."""
    if not isinstance(model, nn.Module):
        raise PlanError(f"from_pytorch takes a torch.nn.Module, got {type(model).__name__}.")
    model = copy.deepcopy(model).double().eval()
    if isinstance(model, (*AFFINE_MODULES, *NONLINEAR_MODULES)):
        # fx traces through a bare leaf module's forward; as a one-layer chain it stays a layer.
        model = nn.Sequential(model)
    stages = walk(trace(model), tuple(input_shape))
    if stages[0].source != 0 or not stages[0].affine.names or stages[0].affine.names == ["identity"]:
        raise PlanError(
            "The model must start with a linear layer (Linear, Conv2d, ...), which the server computes on the "
            "encrypted input."
        )
    return ImportedModel(tuple(input_shape), [(s.affine, s.ops) for s in stages], [s.source for s in stages])
