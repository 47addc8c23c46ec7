"""The enclave program: the only holder of the CKKS secret key.

It answers four requests, all relayed by the untrusted server:

- ``evidence``: its attestation evidence and the public CKKS context it binds;
- ``open_session``: an owner's secure channel (see ``protocol.channel``);
- ``register_model``: a model graph the model owner vouched for through its
  channel; answered with Galois keys for exactly the rotations the graph uses;
- ``activate``: the server's partial sums of one layer. The enclave decrypts,
  adds the partial sums and the layer's bias, applies the exact nonlinear
  steps and either re-encrypts the result in the next layer's input layout
  (with a key mask made between requests, see ``tee.precompute``) or, after
  the last layer, releases it sealed to the data owner's session.
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
from he.graph import ModelGraph, Placement
from protocol.channel import Session, accept_owner_session, raw_public
from protocol.errors import ChannelError, CiphertextError, ErrorCode, HeclaveError, PlanError, ProtocolError
from protocol.evidence import Runtime
from protocol.messages import Message, batch_size, field_of
from protocol.transport import dispatch

from .execution import Form, ModelRuntime, parse_values
from .precompute import MaskPool
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
        self._masks = MaskPool(self.keys)
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._models: OrderedDict[str, ModelRuntime] = OrderedDict()
        self._authorised: OrderedDict[tuple[str, str], Session] = OrderedDict()
        if self._state is not None:
            for model_id, (graph, weights) in self._state.models().items():
                try:
                    self._models[model_id] = ModelRuntime.from_secrets(ModelGraph.from_bytes(graph), weights)
                except HeclaveError as exc:
                    log.error("cannot restore model %s; deploy it again: %s", model_id, exc.message)
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

    def idle(self) -> bool:
        """Precompute blinding pads and key masks between requests; true while there is more to do."""
        runtimes = list(self._models.values())
        if any(runtime.refill() for runtime in runtimes):
            return True
        return any(runtime.graph.reencrypts for runtime in runtimes) and self._masks.refill()

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
        if len(request.buffers) != 1:
            raise ProtocolError(
                "'register_model' carries the owner's sealed envelope as its one buffer.", ErrorCode.BAD_FIELD
            )
        vouched = _unpack_map(session.open(request.buffers[0], b"register"))
        if vouched.get("graph") != hashlib.sha256(graph_bytes).digest():
            raise ChannelError("The model graph is not the one the model owner sealed; refusing it.")
        graph = ModelGraph.from_bytes(graph_bytes)
        if graph.params != self.keys.params:
            raise PlanError(
                f"The graph is planned for CKKS parameters {graph.params}, the enclave uses {self.keys.params}."
            )
        if len(self._models) >= MAX_MODELS:
            raise HeclaveError(f"The enclave holds its limit of {MAX_MODELS} models.", ErrorCode.BUSY)
        secret_weights = vouched.get("weights") if isinstance(vouched.get("weights"), dict) else {}
        runtime = ModelRuntime.from_secrets(graph, secret_weights)
        model_id = secrets.token_hex(16)
        self._models[model_id] = runtime
        if self._state is not None:
            self._state.save_model(model_id, graph_bytes, secret_weights)
        galois = self.keys.galois_keys(graph.rotation_steps)
        log.info(
            "registered model %s (%d stages, %d rotation steps)", model_id, len(graph.stages), len(graph.rotation_steps)
        )
        return request.reply({"model_id": model_id, "galois_steps": graph.rotation_steps}, [galois])

    def _activate(self, request: Message) -> Message:
        model_id = field_of(request.content, "model_id", str)
        runtime = self._models.get(model_id)
        if runtime is None:
            raise HeclaveError(f"Unknown model {model_id!r}; deploy it again.", ErrorCode.UNKNOWN_MODEL)
        stages = runtime.graph.stages
        batch = batch_size(request.content)
        request_id = field_of(request.content, "request_id", str)
        form = _form(request.content)
        index = field_of(request.content, "stage", int)
        if form is Form.INPUT:
            xs, start = self._open_input(request, runtime, batch), 0
        else:
            if not 0 <= index < len(stages):
                raise ProtocolError(f"Stage {index} is outside 0..{len(stages) - 1}.", ErrorCode.BAD_FIELD)
            values = self._values(request, runtime, index, form, batch)
            xs, start = runtime.finish(index, form, values, batch, request_id), index + 1
        following, xs = runtime.advance(start, xs)
        if following == len(stages):
            return request.reply({"result": self._release(request, runtime.graph, xs)})
        placement = stages[following].placement
        offline_ms = 0.0
        if placement is Placement.HE:
            encrypted = [self._masks.encrypt(row) for row in stages[following].geometry.gather_batch(xs)]
            frames, reply_form = [data for data, _ in encrypted], Form.CIPHERTEXTS
            offline_ms = sum(ms for _, ms in encrypted)
        elif placement is Placement.BLINDED:
            blinded, offline_ms = runtime.blind(following, xs, request_id)
            frames, reply_form = [blinded.astype("<i8").tobytes()], Form.BLINDED
        else:
            frames, reply_form = [np.ascontiguousarray(xs, dtype="<f8").tobytes()], Form.PLAIN
        content = {"next": following, "form": reply_form.value, "enclave_offline_ms": offline_ms}
        return request.reply(content, frames)

    def _values(self, request: Message, runtime: ModelRuntime, index: int, form: Form, batch: int) -> np.ndarray:
        """What the server sent for stage ``index``, checked against the stage's placement."""
        stage = runtime.graph.stages[index]
        expected = {Form.PARTIALS: Placement.HE, Form.BLINDED: Placement.BLINDED, Form.PLAIN: Placement.PLAIN}
        if expected.get(form) is not stage.placement:
            raise ProtocolError(
                f"Stage {index} is placed {stage.placement.value!r}; {form.value!r} does not fit it.",
                ErrorCode.BAD_FIELD,
            )
        g = stage.geometry
        if form is Form.PARTIALS:
            return g.scatter_batch(self._decrypt_partials(request, g.groups(batch) * g.out_cts), batch)
        if form is Form.BLINDED:
            return parse_values(request.buffers, "<i8", (batch, g.rows), "blinded layer output")
        return parse_values(request.buffers, "<f8", (batch, _size(stage.result_shape)), "plain activation")

    def _open_input(self, request: Message, runtime: ModelRuntime, batch: int) -> np.ndarray:
        """The data owner's input sealed in its authorisation, for a model whose first stage is not ``he``."""
        session, authorisation = self._authorisation(request)
        self._authorised[(request.content["model_id"], request.content["request_id"])] = session
        while len(self._authorised) > MAX_SESSIONS:
            self._authorised.popitem(last=False)
        blob = authorisation.get("input")
        size = _size(runtime.graph.input_shape)
        if not isinstance(blob, bytes) or len(blob) != batch * size * 8:
            raise ProtocolError(f"The sealed input must hold {batch}x{size} float64 values.", ErrorCode.BAD_FIELD)
        return np.frombuffer(blob, dtype="<f8").reshape(batch, size)

    def _authorisation(self, request: Message) -> tuple[Session, dict]:
        session = self._session(request.content)
        request_id = field_of(request.content, "request_id", str)
        authorisation = _unpack_map(
            session.open(field_of(request.content, "envelope", bytes), b"infer:" + request_id.encode())
        )
        if authorisation.get("model_id") != request.content["model_id"]:
            raise ChannelError("The data owner did not authorise a release of this model's output.")
        return session, authorisation

    def _decrypt_partials(self, request: Message, expected: int) -> np.ndarray:
        if len(request.buffers) != expected:
            raise CiphertextError(f"The layer produces {expected} ciphertexts, {len(request.buffers)} arrived.")
        return np.stack([self.keys.decrypt_output(data) for data in request.buffers])

    def _release(self, request: Message, graph: ModelGraph, ys: np.ndarray) -> bytes:
        request_id = field_of(request.content, "request_id", str)
        session = self._authorised.pop((request.content["model_id"], request_id), None)
        if session is None:
            session, _ = self._authorisation(request)
        return seal_result(session, request_id, ys, graph.release)


def _form(content: dict) -> Form:
    try:
        return Form(field_of(content, "form", str))
    except ValueError:
        raise ProtocolError(
            f"Unknown form; use one of {', '.join(f.value for f in Form)}.", ErrorCode.BAD_FIELD
        ) from None


def _unpack_map(data: bytes) -> dict:
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception:
        value = None
    if not isinstance(value, dict):
        raise ProtocolError("A sealed payload must be a msgpack map.", ErrorCode.BAD_FIELD)
    return value


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))
