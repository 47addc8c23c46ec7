"""CKKS under heclave: parameters, contexts, slot layouts, encrypted linear kernels, and the enclave's own
decryption and encryption (``sealformat``, ``rns``, ``slots``, ``sampling``)."""

from .context import CkksParams, PublicContext, SecretKeySet, Toolkit
from .graph import EnclaveOp, ModelGraph, OpKind, Placement, ReleaseMode, ReleasePolicy, Stage
from .layout import GroupedLayout, Layout, LinearGeometry, UnitCosts, choose_geometry, choose_layout
from .linear import LinearKernel, OpCounter, WeightForm, encrypt_weights

__all__ = [
    "CkksParams",
    "EnclaveOp",
    "GroupedLayout",
    "Layout",
    "LinearGeometry",
    "LinearKernel",
    "ModelGraph",
    "OpCounter",
    "OpKind",
    "Placement",
    "PublicContext",
    "ReleaseMode",
    "ReleasePolicy",
    "SecretKeySet",
    "Stage",
    "Toolkit",
    "UnitCosts",
    "WeightForm",
    "choose_geometry",
    "choose_layout",
    "encrypt_weights",
]
