"""The data owner: encrypts its input in the model's input layout and opens the sealed result."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from he.graph import ModelGraph, Placement
from protocol.errors import ErrorCode, HeclaveError, ProtocolError
from protocol.evidence import VerifierPolicy
from protocol.messages import MAX_BATCH, Message, field_of

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
    """Sends private inputs to a deployed model; only this owner can open the results."""

    def __init__(
        self,
        endpoint: str,
        server_key: bytes | Path,
        policy: VerifierPolicy = VerifierPolicy(),
        timeout_s: float = 120.0,
    ) -> None:
        self.connection = AttestedConnection(endpoint, server_key, policy, timeout_s)
        self._graphs: dict[str, ModelGraph] = {}
        self._stale_session = False

    def graph(self, model_id: str) -> ModelGraph:
        """The deployed model's public graph: input shape and layout."""
        if model_id not in self._graphs:
            reply = self.connection.request(Message("model_info", {"model_id": model_id}))
            self._graphs[model_id] = ModelGraph.from_bytes(field_of(reply.content, "graph", bytes))
        return self._graphs[model_id]

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
        graph = self.graph(model_id)
        xs = np.asarray(xs, dtype=np.float64)
        size = int(np.prod(graph.input_shape))
        if xs.ndim == 0 or xs.size != len(xs) * size or not 1 <= len(xs) <= MAX_BATCH:
            raise ProtocolError(
                f"Expected 1 to {MAX_BATCH} inputs of shape {graph.input_shape} for model {model_id}, "
                f"got an array of shape {xs.shape}.",
                ErrorCode.BAD_FIELD,
            )
        flat = np.ascontiguousarray(xs.reshape(len(xs), size), dtype="<f8")
        authorisation: dict = {"model_id": model_id}
        first = graph.stages[0].placement
        if first is Placement.HE:
            frames = [
                self.connection.public_context.encrypt(row) for row in graph.stages[0].geometry.gather_batch(flat)
            ]
        elif first is Placement.PLAIN:
            log.warning("model %s starts with a plain layer: the server sees this input", model_id)
            frames = [flat.tobytes()]
        else:  # the enclave takes the input first: it travels sealed in the authorisation
            frames, authorisation["input"] = [], flat.tobytes()
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
        return Message("infer", content, frames)

    def close(self) -> None:
        self.connection.close()
