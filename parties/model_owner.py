"""The model owner: plans its torch model and deploys it with its weights encrypted."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch.nn as nn

from he.graph import ReleasePolicy
from he.linear import WeightForm, encrypt_weights
from plan import Plan, plan_pytorch
from protocol.evidence import VerifierPolicy
from protocol.messages import Message

from .connection import AttestedConnection

log = logging.getLogger(__name__)


class ModelOwner:
    """Deploys models to a server whose enclave passed this owner's policy."""

    def __init__(
        self, endpoint: str, server_key: bytes | Path, policy: VerifierPolicy = VerifierPolicy(), timeout_s: float = 600.0
    ) -> None:
        self.connection = AttestedConnection(endpoint, server_key, policy, timeout_s)

    def plan(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        weights: WeightForm | str = WeightForm.ENCRYPTED,
        release: ReleasePolicy = ReleasePolicy(),
        name: str = "model",
        batch: int = 1,
    ) -> Plan:
        """Import and plan ``model`` for the enclave's CKKS parameters (``batch``: see :func:`plan.plan_model`)."""
        params = self.connection.public_context.params
        return plan_pytorch(
            model, input_shape, weight_form=weights, release=release, params=params, name=name, batch=batch
        )

    def deploy(self, plan: Plan) -> str:
        """Upload the plan and its weights (encrypted unless the plan says plain); returns the model id."""
        graph_bytes = plan.graph.to_bytes()
        envelope = self.connection.session.seal(hashlib.sha256(graph_bytes).digest(), b"register")
        masks, frames = self._weights(plan)
        reply = self.connection.request(
            Message(
                "deploy",
                {"graph": graph_bytes, "session_id": self.connection.session.session_id, "envelope": envelope, "masks": masks},
                frames,
            )
        )
        return str(reply.content["model_id"])

    def _weights(self, plan: Plan) -> tuple[list[bytes], list[bytes]]:
        if plan.graph.weight_form is WeightForm.PLAIN:
            log.warning("deploying with PLAIN weights: the server will hold the model's weights in the clear")
            return [], [np.ascontiguousarray(w, dtype="<f8").tobytes() for w in plan.weights]
        context = self.connection.public_context
        masks, frames = [], []
        for stage, w in zip(plan.graph.stages, plan.weights):
            mask, encrypted = encrypt_weights(context, stage.geometry, w)
            masks.append(np.packbits(mask.ravel()).tobytes())
            frames.extend(encrypted)
        return masks, frames

    def close(self) -> None:
        self.connection.close()
