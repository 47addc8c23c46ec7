"""The data owner: encrypts its input in the model's input layout and opens the sealed result.

It trusts only the enclave: a model's graph and public context come from the
enclave through this owner's session, bound to the model id, never from the
server's word; its input also travels sealed in the authorisation, so the
enclave can check the first layer the server computes on it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from heclave.graph.model import ModelGraph
from heclave.graph.placement import Placement
from heclave.he.context import PublicContext
from heclave.protocol.errors import ChannelError, ErrorCode, HeclaveError, PlanError, ProtocolError
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity
from heclave.protocol.messages import MAX_BATCH, Message, MessageType, field_of

from .connection import AttestedConnection

log = logging.getLogger(__name__)


def _label(result: dict) -> int:
    if "label" in result:
        return int(result["label"])
    if "topk" in result:
        return int(result["topk"][0])
    return int(np.argmax(result["logits"]))


@dataclass
class Inference:
    """The released results of one request (one query, or a batch) and where its time went."""

    results: list[dict]
    latency_ms: float
    encrypt_ms: float
    server: dict
    bytes_moved: int

    @property
    def result(self) -> dict:
        """The first (for a single query, the only) result."""
        return self.results[0]

    @property
    def logits(self) -> np.ndarray:
        """The first query's logits (when the deployment releases logits)."""
        return np.asarray(self.result["logits"])

    @property
    def noise_sd(self) -> float:
        """The standard deviation of the noise the enclave added to these logits before rounding them.

        It hides what a server could have slipped under the enclave's checks
        (see the README's threat model); it is zero when no layer ran outside
        the enclave.
        """
        return max(float(r.get("noise_sd", 0.0)) for r in self.results)

    @property
    def label(self) -> int:
        return _label(self.result)

    @property
    def batch_logits(self) -> np.ndarray:
        """``[B, classes]``: every query's logits."""
        return np.asarray([r["logits"] for r in self.results])

    @property
    def labels(self) -> list[int]:
        return [_label(r) for r in self.results]


class DataOwner:
    """Sends private inputs to a deployed model; only this owner can open the results.

    It talks to the enclave as ``identity`` (``Identity.load(path)`` of a file
    from ``heclave keygen``): the model's owner must have named that identity,
    or opened the model to anyone, for the enclave to serve it.
    """

    def __init__(
        self,
        endpoint: str,
        server_key: bytes | Path,
        identity: Identity,
        policy: VerifierPolicy = VerifierPolicy(),
        timeout_s: float = 120.0,
        allow_plain_input: bool = False,
    ) -> None:
        """``allow_plain_input`` lets a model whose first layer is ``plain`` receive this owner's inputs,
        which the server then sees in the clear; without it such a model is refused before anything is sent."""
        self.connection = AttestedConnection(endpoint, server_key, identity, policy, timeout_s)
        self.allow_plain_input = allow_plain_input
        self._models: dict[str, tuple[ModelGraph, PublicContext]] = {}
        self._stale_session = False

    def graph(self, model_id: str) -> ModelGraph:
        """The deployed model's graph (input shape, layouts, placements), as the enclave holds it."""
        return self._model(model_id)[0]

    def context(self, model_id: str) -> PublicContext:
        """The model's own public CKKS context, as the enclave made it: inputs are encrypted under it."""
        return self._model(model_id)[1]

    def _model(self, model_id: str) -> tuple[ModelGraph, PublicContext]:
        """Graph and public context from the enclave, accepted only if bound to ``model_id`` in this session."""
        if model_id not in self._models:
            session = self.connection.session
            envelope = session.seal(msgpack.packb({"model_id": model_id}), b"model_info")
            content = {"model_id": model_id, "session_id": session.session_id, "envelope": envelope}
            reply = self.connection.request(Message(MessageType.MODEL_INFO, content))
            graph_bytes = field_of(reply.content, "graph", bytes)
            binding = session.open(field_of(reply.content, "binding", bytes), b"model:" + model_id.encode())
            bound = msgpack.unpackb(binding, raw=False)
            if (
                len(reply.buffers) != 1
                or bound.get("model_id") != model_id
                or bound.get("graph") != hashlib.sha256(graph_bytes).digest()
                or bound.get("context") != hashlib.sha256(reply.buffers[0]).digest()
            ):
                raise ChannelError("The model's graph or keys are not the ones the enclave holds; send nothing.")
            self._models[model_id] = (ModelGraph.from_bytes(graph_bytes), PublicContext.from_bytes(reply.buffers[0]))
        return self._models[model_id]

    def infer(self, model_id: str, x: np.ndarray) -> Inference:
        """Classify one input; returns what the deployment releases."""
        return self.infer_batch(model_id, np.asarray(x)[None])

    def infer_batch(self, model_id: str, xs: np.ndarray) -> Inference:
        """Classify a batch in one request; a model planned for batches packs several queries per ciphertext."""
        if self._stale_session:
            self.connection.reopen()
            self._stale_session = False
        started = time.perf_counter()
        request = self.prepare(model_id, xs)
        return self.send(request, (time.perf_counter() - started) * 1e3)

    def send(self, request: Message, encrypt_ms: float = 0.0) -> Inference:
        """Send a request made by :meth:`prepare` (in the order they were prepared) and open its result."""
        started = time.perf_counter() - encrypt_ms / 1e3
        session, client = self.connection.session, self.connection.client
        before = client.bytes_sent + client.bytes_received
        try:
            reply = self.connection.request(request)
            sealed = field_of(reply.content, "result", bytes)
            opened = session.open(sealed, b"result:" + request.content["request_id"].encode())
            results = msgpack.unpackb(opened, raw=False)["results"]
        except HeclaveError:
            # The channel's counters may now disagree, and it never resynchronises: the next request
            # opens a fresh session (not now: the enclave may be the thing that just failed).
            self._stale_session = True
            raise
        latency_ms = (time.perf_counter() - started) * 1e3
        stats = reply.content.get("stats", {})
        moved = client.bytes_sent + client.bytes_received - before + int(stats.get("enclave_bytes", 0))
        return Inference(results, latency_ms, encrypt_ms, stats, moved)

    def prepare(self, model_id: str, xs: np.ndarray) -> Message:
        """The ``infer`` request for a batch: inputs encrypted in the model's layout, release authorised.

        Each call consumes one envelope of the session, so a prepared request is
        good for exactly one send.
        """
        graph, context = self._model(model_id)
        xs = np.asarray(xs, dtype=np.float64)
        size = int(np.prod(graph.input_shape))
        if xs.ndim == 0 or xs.size != len(xs) * size or not 1 <= len(xs) <= MAX_BATCH:
            raise ProtocolError(
                f"Expected 1 to {MAX_BATCH} inputs of shape {graph.input_shape} for model {model_id}, "
                f"got an array of shape {xs.shape}.",
                ErrorCode.BAD_FIELD,
            )
        flat = np.ascontiguousarray(xs.reshape(len(xs), size), dtype="<f8")
        first = graph.stages[0].placement
        if first is Placement.PLAIN and not self.allow_plain_input:
            raise PlanError(
                f"Model {model_id}'s first layer is 'plain': the server would see this input in the clear. "
                "Nothing was sent; pass allow_plain_input=True to accept that."
            )
        authorisation = {
            "model_id": model_id,
            "batch": len(xs),
            "input": flat.tobytes(),
            "allow_plain_input": self.allow_plain_input,
        }
        frames = []
        if first is Placement.HE:
            frames = [context.encrypt(row) for row in graph.stages[0].layout.gather_batch(flat)]
        session = self.connection.session
        request_id = secrets.token_hex(12)
        envelope = session.seal(msgpack.packb(authorisation), b"infer:" + request_id.encode())
        content = {
            "model_id": model_id,
            "session_id": session.session_id,
            "request_id": request_id,
            "envelope": envelope,
            "batch": len(xs),
        }
        return Message(MessageType.INFER, content, frames)

    def close(self) -> None:
        self.connection.close()
