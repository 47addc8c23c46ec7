"""heclave: confidential neural-network inference among a model owner, a data owner and an untrusted server.

The server evaluates the linear layers under CKKS; an SGX enclave holds the
keys and does the exact nonlinear steps, re-encryption and release. A first
program::

    import heclave

    owner = heclave.ModelOwner(endpoint, "server.key", heclave.Identity.load("owner.key"), policy)
    model_id = owner.deploy(owner.plan(model, (1, 8, 8)), readers=[reader_identity_hex])

The subpackages are ``heclave.protocol`` (wire, identities, channel,
attestation), ``heclave.graph`` (the deployment plan as plain data),
``heclave.arith`` (exact arithmetic outside CKKS), ``heclave.he`` (CKKS),
``heclave.tee`` (the enclave program), ``heclave.plan`` (import and planning,
with torch) and ``heclave.parties`` (the processes and the command line). The
names below are imported when first used, so that the enclave, which imports
``heclave.tee``, never loads torch or the parties through this module.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelOwner": "heclave.parties.model_owner",
    "DataOwner": "heclave.parties.data_owner",
    "Inference": "heclave.parties.data_owner",
    "Cluster": "heclave.parties.processes",
    "Identity": "heclave.protocol.identity",
    "VerifierPolicy": "heclave.protocol.evidence",
    "from_pytorch": "heclave.plan.importer",
    "plan_model": "heclave.plan.planner",
    "plan_pytorch": "heclave.plan.planner",
    "Plan": "heclave.plan.planner",
    "Placement": "heclave.graph.placement",
    "ReleaseMode": "heclave.graph.release",
    "ReleasePolicy": "heclave.graph.release",
    "WeightForm": "heclave.graph.placement",
    "CkksParams": "heclave.graph.params",
    "ErrorCode": "heclave.protocol.errors",
    "HeclaveError": "heclave.protocol.errors",
    "AttestationError": "heclave.protocol.errors",
    "ChannelError": "heclave.protocol.errors",
    "CiphertextError": "heclave.protocol.errors",
    "ForbiddenError": "heclave.protocol.errors",
    "IntegrityError": "heclave.protocol.errors",
    "PlanError": "heclave.protocol.errors",
    "ProtocolError": "heclave.protocol.errors",
    "QuotaError": "heclave.protocol.errors",
    "UnavailableError": "heclave.protocol.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'heclave' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
