"""CKKS under heclave: parameters, contexts, slot layouts and encrypted linear kernels."""

from .context import CkksParams, PublicContext, SecretKeySet, Toolkit
from .graph import EnclaveOp, ModelGraph, OpKind, ReleaseMode, ReleasePolicy, Stage
from .layout import LinearGeometry, UnitCosts, choose_geometry
from .linear import LinearKernel, OpCounter, WeightForm, encrypt_weights

__all__ = [
    "CkksParams",
    "EnclaveOp",
    "LinearGeometry",
    "LinearKernel",
    "ModelGraph",
    "OpCounter",
    "OpKind",
    "PublicContext",
    "ReleaseMode",
    "ReleasePolicy",
    "SecretKeySet",
    "Stage",
    "Toolkit",
    "UnitCosts",
    "WeightForm",
    "choose_geometry",
    "encrypt_weights",
]
