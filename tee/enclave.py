"""The enclave program: the only holder of each model's CKKS secret key.

It answers six requests, all relayed by the untrusted server, and believes
nothing the server says that it cannot check:

- ``evidence``: its attestation evidence and the CKKS parameters it binds;
- ``open_session``: an owner's secure channel (see ``protocol.channel``);
- ``register_model``: a model graph and the secrets its owner sealed to the
  enclave (the graph's hash, the weights it needs for its own stages and for
  checking the server's, the biases); the enclave makes the model's own CKKS
  key set and answers with its public context (Galois keys for exactly the
  rotations the graph uses) and a binding sealed to the owner;
- ``model_info``: the graph and public context of a model, bound in a sealed
  reply to a data owner who asked through its session;
- ``begin``: a data owner's authorisation (model, batch and the input itself,
  sealed in its session), which opens a request (``tee.requests``);
- ``activate``: the server's result for the request's next stage, in graph
  order and once; the enclave refuses anything that stage would not produce,
  verifies the result (``tee.verify``), applies the exact nonlinear steps, and
  either hands out the next stage's input or, after the last stage, releases the
  output sealed to the data owner's session (``tee.release``). Anything refused
  ends the request.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from he.context import CkksParams, SecretKeySet, public_parameters
from he.graph import ModelGraph, Placement
from protocol.channel import Session, accept_owner_session, raw_public
from protocol.errors import ChannelError, ErrorCode, HeclaveError, PlanError, ProtocolError
from protocol.evidence import Runtime
from protocol.messages import Message, batch_size, field_of
from protocol.transport import dispatch

from .execution import Form, ModelRuntime
from .release import FLOOD, seal_result
from .requests import Request, RequestTable
from .runtime import collect_evidence, detect
from .state import EnclaveState

log = logging.getLogger(__name__)

MAX_SESSIONS = 4096
MAX_MODELS = 256


class Enclave:
    """Key holder, verifier and exact-nonlinearity service; one instance per enclave process.

    ``insecure_skip_verification`` turns the checks of server-computed layers
    off, for measuring what they cost (``heclave bench cnn``) and nothing else:
    without them the server can read any model's secrets through the releases.
    """

    def __init__(
        self,
        params: CkksParams = CkksParams(),
        runtime: Runtime | None = None,
        state_dir: Path | None = None,
        insecure_skip_verification: bool = False,
    ) -> None:
        self.params = params
        self._state = EnclaveState(state_dir) if state_dir is not None else None
        self.identity = self._state.identity() if self._state is not None else X25519PrivateKey.generate()
        self.runtime = runtime or detect()
        self.public_parameters = public_parameters(params)
        self.evidence = collect_evidence(raw_public(self.identity.public_key()), self.public_parameters, self.runtime)
        self._evidence_hash = self.evidence.digest()
        self._verify = not insecure_skip_verification
        if not self._verify:
            log.warning("INSECURE: layer results are not verified; use this only to measure what verifying costs")
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._models: OrderedDict[str, ModelRuntime] = OrderedDict()
        self._requests = RequestTable()
        self._restore()
        self._handlers = {
            "evidence": self._evidence,
            "open_session": self._open_session,
            "register_model": self._register_model,
            "model_info": self._model_info,
            "begin": self._begin,
            "activate": self._activate,
        }

    def _restore(self) -> None:
        if self._state is None:
            return
        for model_id, (graph, vouched, keys) in self._state.models().items():
            try:
                key_set = SecretKeySet(CkksParams.from_wire(keys["params"]), keys)
                self._models[model_id] = self._runtime(ModelGraph.from_bytes(graph), key_set, vouched)
            except (HeclaveError, KeyError, TypeError) as exc:
                log.error("cannot restore model %s; deploy it again: %s", model_id, getattr(exc, "message", exc))

    def _runtime(self, graph: ModelGraph, keys: SecretKeySet, vouched: dict) -> ModelRuntime:
        return ModelRuntime.from_secrets(graph, keys, vouched, self._verify)

    def handle(self, request: Message) -> Message:
        """Answer one request; raises :class:`HeclaveError` for anything refused."""
        started = time.perf_counter()
        reply = dispatch(self._handlers, request, "enclave")
        reply.content["enclave_ms"] = (time.perf_counter() - started) * 1e3
        return reply

    def idle(self) -> bool:
        """Between messages, prepare the checks of stages the server is computing, then precompute blinding
        pads and key masks; true while there is more to do."""
        for state in self._requests:
            runtime = self._models.get(state.model_id)
            if runtime is not None and runtime.prepare(state):
                return True
        return any(runtime.refill() for runtime in list(self._models.values()))

    def _evidence(self, request: Message) -> Message:
        return request.reply({"evidence": self.evidence.to_wire()}, [self.public_parameters])

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

    def _model(self, content: dict) -> tuple[str, ModelRuntime]:
        model_id = field_of(content, "model_id", str)
        runtime = self._models.get(model_id)
        if runtime is None:
            raise HeclaveError(f"Unknown model {model_id!r}; deploy it again.", ErrorCode.UNKNOWN_MODEL)
        return model_id, runtime

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
        if graph.params != self.params:
            raise PlanError(f"The graph is planned for CKKS parameters {graph.params}, the enclave uses {self.params}.")
        if len(self._models) >= MAX_MODELS:
            raise HeclaveError(f"The enclave holds its limit of {MAX_MODELS} models.", ErrorCode.BUSY)
        keys = SecretKeySet(self.params)
        runtime = self._runtime(graph, keys, vouched)
        model_id = secrets.token_hex(16)
        self._models[model_id] = runtime
        if self._state is not None:
            self._state.save_model(model_id, graph_bytes, vouched, keys.export())
        steps = graph.rotation_steps
        context = keys.public.with_galois(keys.galois_keys(steps), steps).to_bytes()
        binding = {"model_id": model_id, "context": hashlib.sha256(context).digest()}
        sealed = session.seal(msgpack.packb(binding), b"registered:" + model_id.encode())
        log.info("registered model %s (%d stages, %d rotation steps)", model_id, len(graph.stages), len(steps))
        return request.reply({"model_id": model_id, "binding": sealed}, [context])

    def _model_info(self, request: Message) -> Message:
        session = self._session(request.content)
        asked = _unpack_map(session.open(field_of(request.content, "envelope", bytes), b"model_info"))
        model_id, runtime = self._model(request.content)
        if asked.get("model_id") != model_id:
            raise ChannelError("The data owner did not ask about this model.")
        graph, context = runtime.graph.to_bytes(), runtime.keys.public.to_bytes()
        binding = {
            "model_id": model_id,
            "graph": hashlib.sha256(graph).digest(),
            "context": hashlib.sha256(context).digest(),
        }
        sealed = session.seal(msgpack.packb(binding), b"model:" + model_id.encode())
        return request.reply({"graph": graph, "binding": sealed}, [context])

    def _begin(self, request: Message) -> Message:
        """Open a request from the data owner's authorisation, and hand out its first server stage."""
        session = self._session(request.content)
        request_id = field_of(request.content, "request_id", str)
        envelope = field_of(request.content, "envelope", bytes)
        authorisation = _unpack_map(session.open(envelope, b"infer:" + request_id.encode()))
        model_id, runtime = self._model(request.content)
        batch = batch_size(request.content)
        if authorisation.get("model_id") != model_id or authorisation.get("batch") != batch:
            raise ChannelError("The data owner did not authorise this model and batch.")
        size = int(np.prod(runtime.graph.input_shape))
        blob = authorisation.get("input")
        if not isinstance(blob, bytes) or len(blob) != batch * size * 8:
            raise ProtocolError(f"The sealed input must hold {batch}x{size} float64 values.", ErrorCode.BAD_FIELD)
        xs = np.frombuffer(blob, dtype="<f8").reshape(batch, size)
        state = Request(model_id, request_id, session, batch)
        self._requests.open(state)
        with _ending_on_failure(self._requests, state):
            index, xs = runtime.advance(0, xs)
            plain_input = index == 0 and runtime.graph.stages[0].placement is Placement.PLAIN
            if plain_input and authorisation.get("allow_plain_input") is not True:
                raise PlanError(
                    "The model's first layer is 'plain', so the server would see the input; the data owner "
                    "did not allow that (DataOwner(..., allow_plain_input=True) does)."
                )
            return self._continue(request, runtime, state, index, xs)

    def _activate(self, request: Message) -> Message:
        """The server's result for the request's expected stage: refused, or checked and carried on."""
        session = self._session(request.content)
        state = self._requests.get(session.session_id, field_of(request.content, "request_id", str))
        with _ending_on_failure(self._requests, state):
            runtime = self._models.get(state.model_id)
            if runtime is None:
                raise HeclaveError("The request's model is no longer deployed.", ErrorCode.UNKNOWN_MODEL)
            if field_of(request.content, "stage", int) != state.expected:
                raise HeclaveError(
                    f"The enclave expects the result of stage {state.expected} of this request, once; it ended "
                    "the request.",
                    ErrorCode.OUT_OF_ORDER,
                )
            last, xs = runtime.accept(state, _form(request.content), request.buffers)
            following, xs = runtime.advance(last + 1, xs)
            return self._continue(request, runtime, state, following, xs)

    def _continue(self, request: Message, runtime: ModelRuntime, state: Request, index: int, xs: np.ndarray) -> Message:
        prepared_ms, state.offline_ms = state.offline_ms, 0.0
        if index == len(runtime.graph.stages):
            ys, noise_ms = runtime.flood(xs, state.bound)
            result = seal_result(state.session, state.request_id, ys, runtime.graph.release, FLOOD * state.bound)
            self._requests.close(state)
            return request.reply({"result": result, "enclave_offline_ms": prepared_ms + noise_ms})
        form, frames, offline_ms = runtime.handout(state, index, xs)
        content = {"next": index, "form": form.value, "enclave_offline_ms": offline_ms + prepared_ms}
        return request.reply(content, frames)


@contextmanager
def _ending_on_failure(table: RequestTable, state: Request) -> Iterator[None]:
    """Close ``state`` if the block raises: a request ends at the first thing refused."""
    try:
        yield
    except BaseException:
        table.close(state)
        raise


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
