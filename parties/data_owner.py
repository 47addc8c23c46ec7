"""The data owner: encrypts its input in the model's input layout and opens the sealed result."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from he.graph import ModelGraph
from protocol.errors import ErrorCode, HeclaveError, ProtocolError
from protocol.evidence import VerifierPolicy
from protocol.messages import Message, field_of

from .connection import AttestedConnection


@dataclass
class Inference:
    """One released result and where its time went."""

    result: dict
    latency_ms: float
    encrypt_ms: float
    server: dict
    bytes_moved: int

    @property
    def logits(self) -> np.ndarray:
        return np.asarray(self.result["logits"])

    @property
    def label(self) -> int:
        if "label" in self.result:
            return int(self.result["label"])
        if "topk" in self.result:
            return int(self.result["topk"][0])
        return int(np.argmax(self.result["logits"]))


class DataOwner:
    """Sends private inputs to a deployed model; only this owner can open the results."""

    def __init__(
        self, endpoint: str, server_key: bytes | Path, policy: VerifierPolicy = VerifierPolicy(), timeout_s: float = 120.0
    ) -> None:
        self.connection = AttestedConnection(endpoint, server_key, policy, timeout_s)
        self._graphs: dict[str, ModelGraph] = {}

    def graph(self, model_id: str) -> ModelGraph:
        """The deployed model's public graph: input shape and layout."""
        if model_id not in self._graphs:
            reply = self.connection.request(Message("model_info", {"model_id": model_id}))
            self._graphs[model_id] = ModelGraph.from_bytes(field_of(reply.content, "graph", bytes))
        return self._graphs[model_id]

    def infer(self, model_id: str, x: np.ndarray) -> Inference:
        """Classify one input; returns what the deployment releases."""
        graph = self.graph(model_id)
        x = np.asarray(x, dtype=np.float64)
        if x.size != int(np.prod(graph.input_shape)):
            raise ProtocolError(
                f"Input has {x.size} values; model {model_id} takes shape {graph.input_shape}.", ErrorCode.BAD_FIELD
            )
        started = time.perf_counter()
        layout = graph.stages[0].geometry.gather(np.append(x.reshape(-1), 1.0))
        frames = [self.connection.public_context.encrypt(row) for row in layout]
        encrypt_ms = (time.perf_counter() - started) * 1e3
        session = self.connection.session
        request_id = secrets.token_hex(12)
        envelope = session.seal(msgpack.packb({"model_id": model_id}), b"infer:" + request_id.encode())
        client = self.connection.client
        before = client.bytes_sent + client.bytes_received
        content = {"model_id": model_id, "session_id": session.session_id, "request_id": request_id, "envelope": envelope}
        try:
            reply = self.connection.request(Message("infer", content, frames))
            sealed = field_of(reply.content, "result", bytes)
            result = msgpack.unpackb(session.open(sealed, b"result:" + request_id.encode()), raw=False)
        except HeclaveError:
            # The channel's counters may now disagree, and it never resynchronises: start afresh.
            self.connection.reopen()
            raise
        latency_ms = (time.perf_counter() - started) * 1e3
        stats = reply.content.get("stats", {})
        moved = client.bytes_sent + client.bytes_received - before + int(stats.get("enclave_bytes", 0))
        return Inference(result, latency_ms, encrypt_ms, stats, moved)

    def close(self) -> None:
        self.connection.close()
