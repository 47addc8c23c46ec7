"""CKKS under heclave: parameters, contexts, slot layouts, encrypted linear kernels, and the enclave's own
decryption and encryption (``sealformat``, ``rns``, ``slots``, ``sampling``)."""

from .context import CkksParams, PublicContext, SecretKeySet, Toolkit
from .cyclic import LinearGeometry
from .graph import EnclaveOp, ModelGraph, OpKind, Placement, ReleaseMode, ReleasePolicy, Stage
from .grouped import GroupedLayout
from .layout import Layout
from .linear import LinearKernel, OpCounter, WeightForm, encrypt_weights
from .paired import PairedRows

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
    "PairedRows",
    "Placement",
    "PublicContext",
    "ReleaseMode",
    "ReleasePolicy",
    "SecretKeySet",
    "Stage",
    "Toolkit",
    "WeightForm",
    "encrypt_weights",
]
