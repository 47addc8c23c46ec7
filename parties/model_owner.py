"""The model owner: plans its torch model and deploys it with its weights encrypted."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import torch.nn as nn

from heclave.arith.blinding import quantize
from heclave.arith.sparse import SparseMatrix
from heclave.graph.placement import Placement, WeightForm
from heclave.graph.release import ReleasePolicy
from heclave.he.context import PublicContext
from heclave.he.linear import diagonal_mask, pack_mask, unpack_mask
from heclave.plan import Plan, plan_pytorch
from heclave.protocol import streams
from heclave.protocol.channel import seal_chunks
from heclave.protocol.errors import ChannelError, HeclaveError
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity, parse_public
from heclave.protocol.messages import Message, MessageType, field_of

from .connection import AttestedConnection

log = logging.getLogger(__name__)

# How long a failed deployment's clean-up waits for the server: it may be the server that is gone.
FORGET_S = 30.0
Progress = Callable[[str, int, int], None]
"""Told how a deployment advances: ``("prepare", weight items made, of)`` while the server's weights are
encrypted (or serialised), then ``("upload", bytes sent, of)``."""


@dataclass(frozen=True)
class Registration:
    """A model the enclave registered: its id, its own public context, and the diagonal masks sealed to it."""

    model_id: str
    context: PublicContext
    masks: list[bytes]


class ModelOwner:
    """Deploys models to a server whose enclave passed this owner's policy.

    The models belong to ``identity``: only a ``ModelOwner`` with the same
    identity can later change who may query them or undeploy them.
    """

    def __init__(
        self,
        endpoint: str,
        server_key: bytes | Path,
        identity: Identity,
        policy: VerifierPolicy = VerifierPolicy(),
        timeout_s: float = 600.0,
    ) -> None:
        self.connection = AttestedConnection(endpoint, server_key, identity, policy, timeout_s)

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
        params = self.connection.params
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

    def deploy(
        self, plan: Plan, readers: Iterable[bytes | str] = (), anyone: bool = False, progress: Progress | None = None
    ) -> str:
        """Register the plan with the enclave, then upload its weights to the server; returns the model id.

        The model belongs to this owner's identity. It may be queried by this
        owner, by the data-owner identities in ``readers`` (public keys, as bytes
        or as the hex ``heclave keygen`` prints), and by any identity at all only
        if ``anyone`` is true; :meth:`grant` changes that later.

        First the enclave receives, sealed in this owner's session, the graph's
        hash and what it needs itself: ``enclave`` and ``blinded`` weights, each
        ``he`` stage's ``W`` (to check the server's results) and bias, and the
        public diagonal masks. It makes the model's own CKKS key set and returns
        its public context, bound to the model id under this session. Then the
        server receives each stage's weights in the form its placement allows
        (ciphertexts under that context for ``he`` unless the plan says plain
        weights, a float64 matrix for ``plain``, field integers for ``blinded``,
        nothing for ``enclave``). The two steps are :meth:`register` and
        :meth:`upload`; the server accepts the upload only from the transport
        client that registered. ``progress`` hears how the upload advances.

        A deployment that fails after the registration (a refused frame, a
        lost connection, a worker refusing the weights) is undeployed again
        where it can be, so it holds none of this owner's models at the
        enclave; the server keeps nothing of it either way.
        """
        registration = self.register(plan, readers, anyone)
        try:
            self.upload(plan, registration, progress)
        except BaseException:
            self._forget(registration.model_id)
            raise
        return registration.model_id

    def register(self, plan: Plan, readers: Iterable[bytes | str] = (), anyone: bool = False) -> Registration:
        """The first step of :meth:`deploy`: the model id and its public context, bound by the enclave."""
        graph_bytes = plan.graph.to_bytes()
        masks = self._masks(plan)
        weights, biases = self._enclave_secrets(plan)
        payload = {
            "graph": hashlib.sha256(graph_bytes).digest(),
            "weights": weights,
            "biases": biases,
            "masks": masks,
            **_rights(readers, anyone),
        }
        session = self.connection.session
        sealed = msgpack.packb(payload)
        envelopes = seal_chunks(session, sealed, b"register")
        content = {"graph": graph_bytes, "session_id": session.session_id, "sealed_bytes": len(sealed)}
        del payload, weights, biases, sealed
        reply = self.connection.request(Message(MessageType.REGISTER, content, envelopes))
        model_id = field_of(reply.content, "model_id", str)
        context = self._bound_context(model_id, field_of(reply.content, "binding", bytes), reply.buffers)
        return Registration(model_id, context, masks)

    def upload(self, plan: Plan, registration: Registration, progress: Progress | None = None) -> None:
        """The second step of :meth:`deploy`: the weights, in the forms the server may hold, under the
        registered model's context and with the masks the enclave was given.

        They go as a stream (``protocol.streams``): their sizes first, then parts of at most 16 MB, one
        ciphertext or one chunk of a matrix per frame; the server keeps the model only once all of it
        arrived and its workers accepted it. ``progress`` is told ``("prepare", items, of)`` while the
        weights are encrypted (or serialised) and ``("upload", bytes, of)`` while they travel.
        """
        items = self._server_weights(plan, registration.context, registration.masks, progress)
        content = {"model_id": registration.model_id, "masks": registration.masks}
        told = None if progress is None else functools.partial(progress, "upload")
        streams.send(self.connection.request, Message(MessageType.DEPLOY, content), items, told)

    def _forget(self, model_id: str) -> None:
        """Undeploy a model whose upload failed, if the server and the enclave can still be reached."""
        try:
            self._owner_request(MessageType.UNDEPLOY, model_id, {"model_id": model_id}, b"undeployed:", FORGET_S)
        except HeclaveError as exc:
            log.warning("model %s was registered but not deployed, and could not be removed: %s", model_id, exc.message)

    def grant(self, model_id: str, readers: Iterable[bytes | str], anyone: bool = False) -> None:
        """Replace who may query ``model_id`` (this owner always may); the enclave confirms under the session."""
        asked = {"model_id": model_id, **_rights(readers, anyone)}
        self._owner_request(MessageType.GRANT, model_id, asked, b"granted:")

    def undeploy(self, model_id: str) -> None:
        """Remove ``model_id``: the enclave forgets its keys and secrets, the server stops serving it."""
        self._owner_request(MessageType.UNDEPLOY, model_id, {"model_id": model_id}, b"undeployed:")

    def _owner_request(
        self, kind: MessageType, model_id: str, asked: dict, confirmed: bytes, timeout_s: float | None = None
    ) -> None:
        """Send an owner's sealed instruction about ``model_id``; return once the enclave confirmed it did it."""
        session = self.connection.session
        envelope = session.seal(msgpack.packb(asked), kind.encode() + b":" + model_id.encode())
        content = {"model_id": model_id, "session_id": session.session_id, "envelope": envelope}
        reply = self.connection.request(Message(kind, content), timeout_s)
        done = msgpack.unpackb(session.open(field_of(reply.content, "ack", bytes), confirmed + model_id.encode()))
        if done.get("model_id") != model_id:
            raise ChannelError(f"The enclave confirmed another model than {model_id}; the {kind} did not happen.")

    def _bound_context(self, model_id: str, binding: bytes, buffers) -> PublicContext:
        """The model's public context, only if the enclave bound exactly these bytes to this model id."""
        opened = msgpack.unpackb(self.connection.session.open(binding, b"registered:" + model_id.encode()))
        if len(buffers) != 1 or opened.get("model_id") != model_id:
            raise ChannelError("The enclave's registration reply does not match; do not deploy through this server.")
        if opened.get("context") != hashlib.sha256(buffers[0]).digest():
            raise ChannelError("The server substituted the model's public context; do not deploy through it.")
        return PublicContext.from_bytes(buffers[0])

    @staticmethod
    def _masks(plan: Plan) -> list[bytes]:
        """The public diagonal mask of every encrypted ``he`` stage (empty elsewhere), packed."""
        encrypted = plan.graph.weight_form is WeightForm.ENCRYPTED
        masks = []
        for stage, w, support in zip(plan.graph.stages, plan.weights, plan.supports):
            if stage.placement is Placement.HE and encrypted:
                masks.append(pack_mask(diagonal_mask(stage.layout, w[:, :-1], support[:, :-1])))
            else:
                masks.append(b"")
        return masks

    @staticmethod
    def _enclave_secrets(plan: Plan) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """What only the enclave receives: weights by stage (``W`` of ``he`` stages, for their checks) and biases."""
        weights, biases = {}, {}
        for i, (stage, w) in enumerate(zip(plan.graph.stages, plan.weights)):
            if stage.placement is Placement.HE:
                weights[str(i)] = SparseMatrix.from_dense(w[:, :-1]).to_bytes()
                biases[str(i)] = np.ascontiguousarray(w[:, -1], dtype="<f8").tobytes()
            elif stage.placement is Placement.ENCLAVE:
                weights[str(i)] = SparseMatrix.from_dense(w).to_bytes()
            elif stage.placement is Placement.BLINDED:
                weights[str(i)] = SparseMatrix.from_dense(quantize(w, stage.weight_bits)).to_bytes()
        return weights, biases

    def _server_weights(
        self, plan: Plan, context: PublicContext, masks: list[bytes], progress: Progress | None = None
    ) -> list[bytes]:
        """Each stage's weights in the form the server may hold; encrypted diagonals as ``masks`` select them."""
        graph, frames = plan.graph, []
        count = _item_count(plan, masks)
        for i, (stage, w) in enumerate(zip(graph.stages, plan.weights)):
            placement = stage.placement
            if placement is Placement.HE:
                w = w[:, :-1]
            encrypted = placement is Placement.HE and graph.weight_form is WeightForm.ENCRYPTED
            if placement in (Placement.PLAIN, Placement.BLINDED) or (placement is Placement.HE and not encrypted):
                log.warning(
                    "stage %s: the server will hold its weights in the clear (%s)",
                    stage.out_shape,
                    placement.value if placement is not Placement.HE else "plain weights",
                )
            if encrypted:
                diagonals = stage.layout.diagonals(w)
                for index in zip(*np.nonzero(unpack_mask(masks[i], stage.layout, f"Stage {i}"))):
                    frames.append(context.encrypt(diagonals[index]))
                    if progress is not None:
                        progress("prepare", len(frames), count)
                continue
            if placement is Placement.BLINDED:
                frames.append(SparseMatrix.from_dense(quantize(w, stage.weight_bits)).to_bytes())
            elif placement is Placement.PLAIN:
                frames.append(SparseMatrix.from_dense(w).to_bytes())
            elif placement is Placement.HE:
                frames.append(np.ascontiguousarray(w, dtype="<f8").tobytes())
            if progress is not None and placement is not Placement.ENCLAVE:
                progress("prepare", len(frames), count)
        return frames

    def close(self) -> None:
        self.connection.close()


def _item_count(plan: Plan, masks: list[bytes]) -> int:
    """How many weight items the server receives: one per encrypted diagonal, one matrix per other server stage."""
    encrypted = plan.graph.weight_form is WeightForm.ENCRYPTED
    count = 0
    for i, stage in enumerate(plan.graph.stages):
        if stage.placement is Placement.HE and encrypted:
            count += int(unpack_mask(masks[i], stage.layout, f"Stage {i}").sum())
        elif stage.placement is not Placement.ENCLAVE:
            count += 1
    return count


def _rights(readers: Iterable[bytes | str], anyone: bool) -> dict:
    """The sealed form of who may query a model: identity keys as bytes, and the explicit ``anyone``."""
    keys = [parse_public(r) if isinstance(r, str) else bytes(r) for r in readers]
    return {"readers": keys, "anyone": bool(anyone)}
