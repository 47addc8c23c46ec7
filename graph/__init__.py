"""The deployment plan as plain, versioned data: one vocabulary for the planner, the server and the enclave.

A :class:`ModelGraph` is a chain of :class:`Stage` s, each an affine layer with
a :class:`Placement` and a slot :class:`Layout`, then its nonlinear
:class:`EnclaveOp` s; the graph names its :class:`CkksParams`, the
:class:`WeightForm` of its ``he`` weights and its :class:`ReleasePolicy`.
Nothing here imports SEAL, torch or the enclave, so every party can read a plan.
"""

from .layouts import CyclicLayout, GroupedLayout, Layout, PairedRows, layout_from_wire
from .model import GRAPH_FORMAT, ModelGraph, Stage
from .ops import EnclaveOp, OpKind
from .params import CkksParams
from .placement import Form, Placement, WeightForm
from .release import ReleaseMode, ReleasePolicy

__all__ = [
    "GRAPH_FORMAT",
    "CkksParams",
    "CyclicLayout",
    "EnclaveOp",
    "Form",
    "GroupedLayout",
    "Layout",
    "ModelGraph",
    "OpKind",
    "PairedRows",
    "Placement",
    "ReleaseMode",
    "ReleasePolicy",
    "Stage",
    "WeightForm",
    "layout_from_wire",
]
