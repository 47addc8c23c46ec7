"""The model owner: plans its torch model and deploys it with its weights encrypted."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import msgpack
import numpy as np
import torch.nn as nn

from he.blinding import quantize
from he.graph import Placement, ReleasePolicy
from he.linear import WeightForm, encrypt_weights
from he.sparse import SparseMatrix
from plan import Plan, plan_pytorch
from protocol.evidence import VerifierPolicy
from protocol.messages import Message

from .connection import AttestedConnection

log = logging.getLogger(__name__)


class ModelOwner:
    """Deploys models to a server whose enclave passed this owner's policy."""

    def __init__(
        self,
        endpoint: str,
        server_key: bytes | Path,
        policy: VerifierPolicy = VerifierPolicy(),
        timeout_s: float = 600.0,
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
        placements: Sequence[Placement | str] | None = None,
    ) -> Plan:
        """Import and plan ``model`` for the enclave's CKKS parameters (``batch``: see :func:`plan.plan_model`)."""
        params = self.connection.public_context.params
        return plan_pytorch(
            model,
            input_shape,
            weight_form=weights,
            release=release,
            params=params,
            name=name,
            batch=batch,
            placements=placements,
        )

    def deploy(self, plan: Plan) -> str:
        """Upload the plan and its weights; returns the model id.

        The server receives each stage's weights in the form its placement
        allows (ciphertexts for ``he`` unless the plan says plain weights, a
        float64 matrix for ``plain``, field integers for ``blinded``, nothing for
        ``enclave``); the enclave receives, sealed in this owner's session, the
        graph's hash and the weights it needs itself (``enclave`` and
        ``blinded`` stages, and the bias of every ``he`` stage).
        """
        graph_bytes = plan.graph.to_bytes()
        secrets_for_enclave = {str(i): blob for i, blob in self._enclave_weights(plan)}
        payload = msgpack.packb({"graph": hashlib.sha256(graph_bytes).digest(), "weights": secrets_for_enclave})
        envelope = self.connection.session.seal(payload, b"register")
        masks, frames = self._server_weights(plan)
        content = {"graph": graph_bytes, "session_id": self.connection.session.session_id, "masks": masks}
        reply = self.connection.request(Message("deploy", content, [envelope, *frames]))
        return str(reply.content["model_id"])

    @staticmethod
    def _enclave_weights(plan: Plan) -> list[tuple[int, bytes]]:
        """What only the enclave receives: ``enclave`` and ``blinded`` weights, and every ``he`` layer's bias."""
        out = []
        for i, (stage, w) in enumerate(zip(plan.graph.stages, plan.weights)):
            if stage.placement is Placement.HE:
                out.append((i, np.ascontiguousarray(w[:, -1], dtype="<f8").tobytes()))
            elif stage.placement is Placement.ENCLAVE:
                out.append((i, SparseMatrix.from_dense(w).to_bytes()))
            elif stage.placement is Placement.BLINDED:
                out.append((i, SparseMatrix.from_dense(quantize(w, stage.weight_bits)).to_bytes()))
        return out

    def _server_weights(self, plan: Plan) -> tuple[list[bytes], list[bytes]]:
        graph, context = plan.graph, self.connection.public_context
        masks, frames = [], []
        for stage, w, support in zip(graph.stages, plan.weights, plan.supports):
            placement = stage.placement
            if placement is Placement.HE:
                w, support = w[:, :-1], support[:, :-1]
            encrypted = placement is Placement.HE and graph.weight_form is WeightForm.ENCRYPTED
            if placement in (Placement.PLAIN, Placement.BLINDED) or (placement is Placement.HE and not encrypted):
                log.warning(
                    "stage %s: the server will hold its weights in the clear (%s)",
                    stage.out_shape,
                    placement.value if placement is not Placement.HE else "plain weights",
                )
            if encrypted:
                mask, cts = encrypt_weights(context, stage.geometry, w, support)
                masks.append(np.packbits(mask.ravel()).tobytes())
                frames.extend(cts)
                continue
            masks.append(b"")
            if placement is Placement.BLINDED:
                frames.append(SparseMatrix.from_dense(quantize(w, stage.weight_bits)).to_bytes())
            elif placement is Placement.PLAIN:
                frames.append(SparseMatrix.from_dense(w).to_bytes())
            elif placement is Placement.HE:
                frames.append(np.ascontiguousarray(w, dtype="<f8").tobytes())
        return masks, frames

    def close(self) -> None:
        self.connection.close()
