"""The enclave program: the only holder of the CKKS secret key.

It answers four requests, all relayed by the untrusted server:

- ``evidence``: its attestation evidence and the public CKKS context it binds;
- ``open_session``: an owner's secure channel (see ``protocol.channel``);
- ``register_model``: a model graph the model owner vouched for through its
  channel; answered with Galois keys for exactly the rotations the graph uses;
- ``activate``: the server's partial sums of one layer. The enclave decrypts,
  adds the partial sums, applies the exact nonlinear steps and either
  re-encrypts the result in the next layer's input layout (secret-key
  encryption: faster, half the bytes) or, after the last layer, releases it
  sealed to the data owner's session.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from pathlib import Path

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from he.context import CkksParams, SecretKeySet
from he.graph import ModelGraph
from protocol.channel import Session, accept_owner_session, raw_public
from protocol.errors import ChannelError, CiphertextError, ErrorCode, HeclaveError, PlanError, ProtocolError
from protocol.evidence import Runtime
from protocol.messages import Message, batch_size, field_of
from protocol.transport import dispatch

from .nonlinear import apply_ops
from .release import seal_result
from .runtime import collect_evidence, detect
from .state import EnclaveState

log = logging.getLogger(__name__)

MAX_SESSIONS = 4096
MAX_MODELS = 256


class Enclave:
    """Key holder and exact-nonlinearity service; one instance per enclave process."""

    def __init__(
        self, params: CkksParams = CkksParams(), runtime: Runtime | None = None, state_dir: Path | None = None
    ) -> None:
        self._state = EnclaveState(state_dir) if state_dir is not None else None
        if self._state is not None:
            self.keys, self.identity = self._state.keys(params)
        else:
            self.keys, self.identity = SecretKeySet(params), X25519PrivateKey.generate()
        self.runtime = runtime or detect()
        self.public_context = self.keys.public.to_bytes()
        self.evidence = collect_evidence(raw_public(self.identity.public_key()), self.public_context, self.runtime)
        self._evidence_hash = self.evidence.digest()
        toolkit = self.keys.toolkit
        self._output_parms = toolkit.context.first_context_data().next_context_data().parms_id()
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._models: OrderedDict[str, ModelGraph] = OrderedDict()
        if self._state is not None:
            self._models.update((mid, ModelGraph.from_bytes(g)) for mid, g in self._state.models().items())
        self._handlers = {
            "evidence": self._evidence,
            "open_session": self._open_session,
            "register_model": self._register_model,
            "activate": self._activate,
        }

    def handle(self, request: Message) -> Message:
        """Answer one request; raises :class:`HeclaveError` for anything refused."""
        started = time.perf_counter()
        reply = dispatch(self._handlers, request, "enclave")
        reply.content["enclave_ms"] = (time.perf_counter() - started) * 1e3
        return reply

    def _evidence(self, request: Message) -> Message:
        return request.reply({"evidence": self.evidence.to_wire()}, [self.public_context])

    def _open_session(self, request: Message) -> Message:
        owner_public = field_of(request.content, "owner_public", bytes)
        session = accept_owner_session(self.identity, owner_public, self._evidence_hash)
        self._sessions[session.session_id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return request.reply({"session_id": session.session_id, "confirm": session.confirmation()})

    def _session(self, content: dict) -> Session:
        sid = field_of(content, "session_id", bytes)
        session = self._sessions.get(sid)
        if session is None:
            raise HeclaveError("Unknown or expired session; open a new session.", ErrorCode.UNKNOWN_SESSION)
        return session

    def _register_model(self, request: Message) -> Message:
        graph_bytes = field_of(request.content, "graph", bytes)
        session = self._session(request.content)
        vouched = session.open(field_of(request.content, "envelope", bytes), b"register")
        if vouched != hashlib.sha256(graph_bytes).digest():
            raise ChannelError("The model graph is not the one the model owner sealed; refusing it.")
        graph = ModelGraph.from_bytes(graph_bytes)
        if graph.params != self.keys.params:
            raise PlanError(f"The graph is planned for CKKS parameters {graph.params}, the enclave uses {self.keys.params}.")
        model_id = secrets.token_hex(16)
        if len(self._models) >= MAX_MODELS:
            raise HeclaveError(f"The enclave holds its limit of {MAX_MODELS} models.", ErrorCode.BUSY)
        self._models[model_id] = graph
        if self._state is not None:
            self._state.save_model(model_id, graph_bytes)
        galois = self.keys.galois_keys(graph.rotation_steps)
        log.info("registered model %s (%d stages, %d rotation steps)", model_id, len(graph.stages), len(graph.rotation_steps))
        return request.reply({"model_id": model_id, "galois_steps": graph.rotation_steps}, [galois])

    def _activate(self, request: Message) -> Message:
        model_id = field_of(request.content, "model_id", str)
        graph = self._models.get(model_id)
        if graph is None:
            raise HeclaveError(f"Unknown model {model_id!r}; deploy it again.", ErrorCode.UNKNOWN_MODEL)
        index = field_of(request.content, "stage", int)
        if not 0 <= index < len(graph.stages):
            raise ProtocolError(f"Stage {index} is outside 0..{len(graph.stages) - 1}.", ErrorCode.BAD_FIELD)
        batch = batch_size(request.content)
        stage = graph.stages[index]
        g = stage.geometry
        partials = self._decrypt_partials(request, g.groups(batch) * g.out_cts)
        xs = np.stack([apply_ops(y, stage.ops) for y in g.scatter_batch(partials, batch)])
        if index + 1 < len(graph.stages):
            layout = graph.stages[index + 1].geometry.gather_batch(xs)
            return request.reply({}, [self.keys.encrypt_symmetric(row) for row in layout])
        return request.reply({"result": self._release(request, graph, xs)})

    def _decrypt_partials(self, request: Message, expected: int) -> np.ndarray:
        if len(request.buffers) != expected:
            raise CiphertextError(f"The layer produces {expected} ciphertexts, {len(request.buffers)} arrived.")
        rows = []
        for data in request.buffers:
            ct = self.keys.toolkit.load_ciphertext(data, "layer output", top_level=False)
            if ct.parms_id() != self._output_parms:
                raise CiphertextError("A layer output is not at the level a linear layer produces; refusing it.")
            rows.append(self.keys.decrypt(ct))
        return np.stack(rows)

    def _release(self, request: Message, graph: ModelGraph, ys: np.ndarray) -> bytes:
        session = self._session(request.content)
        request_id = field_of(request.content, "request_id", str)
        authorisation = msgpack.unpackb(
            session.open(field_of(request.content, "envelope", bytes), b"infer:" + request_id.encode()), raw=False
        )
        if not isinstance(authorisation, dict) or authorisation.get("model_id") != request.content["model_id"]:
            raise ChannelError("The data owner did not authorise a release of this model's output.")
        return seal_result(session, request_id, ys, graph.release)
