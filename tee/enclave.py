"""The enclave program: the only holder of each model's CKKS secret key.

It answers these requests, all relayed by the untrusted server, and believes
nothing the server says that it cannot check:

- ``evidence``: its attestation evidence and the CKKS parameters it binds;
- ``open_session`` and ``confirm_session``: the two halves of an owner's
  handshake (``protocol.channel``), which prove the owner's identity key;
  sessions are counted per identity (``tee.sessions``);
- ``register_model``: a model graph and the secrets its owner sealed to the
  enclave (the graph's hash, the weights it needs for its own stages and for
  checking the server's, the biases, who may query the model), as sealed
  chunks bound to their position and total (``protocol.channel``); the enclave
  makes the model's own CKKS key set and answers with its public context
  (Galois keys for exactly the rotations the graph uses) and a binding sealed
  to the owner. The model belongs to the registering identity (``tee.models``);
- ``grant`` and ``undeploy``: its owner, and only its owner, changes who may
  query a model or removes it, key set and sealed record included;
- ``model_info``: the graph and public context of a model, bound in a sealed
  reply to a data owner who may query it and asked through its session;
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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from heclave.graph.model import ModelGraph
from heclave.graph.params import CkksParams
from heclave.graph.placement import Form, Placement
from heclave.he.context import SecretKeySet, public_parameters
from heclave.protocol.channel import Session, open_chunks
from heclave.protocol.errors import ChannelError, ErrorCode, HeclaveError, PlanError, ProtocolError
from heclave.protocol.evidence import Runtime
from heclave.protocol.messages import Message, MessageType, batch_size, field_of
from heclave.protocol.noise import public_bytes
from heclave.protocol.transport import dispatch

from .execution import ModelRuntime
from .models import ModelTable, Rights
from .release import FLOOD, seal_result
from .requests import Request, RequestTable
from .runtime import collect_evidence, detect
from .sessions import SessionTable
from .state import EnclaveState

log = logging.getLogger(__name__)

# A model's secrets as its owner seals them (weights the enclave needs, biases, masks): they stay in the
# enclave's memory, of which Gramine gives it a fixed size (2 GB by default, tee/gramine).
MAX_SECRETS_BYTES = 512 << 20


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
        self.evidence = collect_evidence(public_bytes(self.identity), self.public_parameters, self.runtime)
        self._verify = not insecure_skip_verification
        if not self._verify:
            log.warning("INSECURE: layer results are not verified; use this only to measure what verifying costs")
        self._models = ModelTable(self._state, self._runtime)
        self._models.restore()
        self._sessions = SessionTable(self.identity, self.evidence.digest(), self._models.standing)
        self._requests = RequestTable()
        self._handlers = {
            MessageType.EVIDENCE: self._evidence,
            MessageType.OPEN_SESSION: self._open_session,
            MessageType.CONFIRM_SESSION: self._confirm_session,
            MessageType.REGISTER_MODEL: self._register_model,
            MessageType.GRANT: self._grant,
            MessageType.UNDEPLOY: self._undeploy,
            MessageType.MODEL_INFO: self._model_info,
            MessageType.BEGIN: self._begin,
            MessageType.ACTIVATE: self._activate,
        }

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
        return any(runtime.refill() for runtime in self._models)

    def _evidence(self, request: Message) -> Message:
        return request.reply({"evidence": self.evidence.to_wire()}, [self.public_parameters])

    def _open_session(self, request: Message) -> Message:
        handshake_id, second = self._sessions.answer(field_of(request.content, "handshake", bytes))
        return request.reply({"handshake_id": handshake_id, "handshake": second})

    def _confirm_session(self, request: Message) -> Message:
        handshake_id = field_of(request.content, "handshake_id", bytes)
        session = self._sessions.accept(handshake_id, field_of(request.content, "handshake", bytes))
        return request.reply({"session_id": session.session_id})

    def _session(self, content: dict) -> Session:
        return self._sessions.get(field_of(content, "session_id", bytes))

    def _sealed(self, request: Message, session: Session, purpose: bytes) -> dict:
        return _unpack_map(session.open(field_of(request.content, "envelope", bytes), purpose))

    def _register_model(self, request: Message) -> Message:
        graph_bytes = field_of(request.content, "graph", bytes)
        session = self._session(request.content)
        total = field_of(request.content, "sealed_bytes", int)
        vouched = _unpack_map(open_chunks(session, request.buffers, b"register", total, MAX_SECRETS_BYTES))
        if vouched.get("graph") != hashlib.sha256(graph_bytes).digest():
            raise ChannelError("The model graph is not the one the model owner sealed; refusing it.")
        graph = ModelGraph.from_bytes(graph_bytes)
        if graph.params != self.params:
            raise PlanError(f"The graph is planned for CKKS parameters {graph.params}, the enclave uses {self.params}.")
        rights = Rights.granted(session.peer, vouched)
        keys = SecretKeySet(self.params)
        model_id = self._models.register(graph_bytes, keys, vouched, rights)
        steps = graph.rotation_steps
        context = keys.public.with_galois(keys.galois_keys(steps), steps).to_bytes()
        binding = {"model_id": model_id, "context": hashlib.sha256(context).digest()}
        sealed = session.seal(msgpack.packb(binding), b"registered:" + model_id.encode())
        log.info("registered model %s (%d stages, %d rotation steps)", model_id, len(graph.stages), len(steps))
        return request.reply({"model_id": model_id, "binding": sealed}, [context])

    def _grant(self, request: Message) -> Message:
        """The owner names who may query its model (the list replaces the previous one)."""
        session, model_id = self._session(request.content), field_of(request.content, "model_id", str)
        asked = self._sealed(request, session, b"grant:" + model_id.encode())
        if asked.get("model_id") != model_id:
            raise ChannelError("The model owner did not ask to change this model.")
        rights = self._models.set_rights(model_id, session.peer, asked)
        done = {"model_id": model_id, "readers": len(rights.readers), "anyone": rights.anyone}
        return request.reply({"ack": session.seal(msgpack.packb(done), b"granted:" + model_id.encode())})

    def _undeploy(self, request: Message) -> Message:
        """The owner removes its model: key set, secrets and sealed record; its open requests end."""
        session, model_id = self._session(request.content), field_of(request.content, "model_id", str)
        asked = self._sealed(request, session, b"undeploy:" + model_id.encode())
        if asked.get("model_id") != model_id:
            raise ChannelError("The model owner did not ask to undeploy this model.")
        self._models.remove(model_id, session.peer)
        self._requests.close_model(model_id)
        log.info("undeployed model %s", model_id)
        done = session.seal(msgpack.packb({"model_id": model_id}), b"undeployed:" + model_id.encode())
        return request.reply({"ack": done})

    def _model_info(self, request: Message) -> Message:
        session, model_id = self._session(request.content), field_of(request.content, "model_id", str)
        asked = self._sealed(request, session, b"model_info")
        runtime = self._models.for_reader(model_id, session.peer)
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
        authorisation = self._sealed(request, session, b"infer:" + request_id.encode())
        model_id = field_of(request.content, "model_id", str)
        runtime = self._models.for_reader(model_id, session.peer)
        batch = batch_size(request.content)
        if authorisation.get("model_id") != model_id or authorisation.get("batch") != batch:
            raise ChannelError("The data owner did not authorise this model and batch.")
        size = int(np.prod(runtime.graph.input_shape))
        blob = authorisation.get("input")
        if not isinstance(blob, bytes) or len(blob) != batch * size * 8:
            raise ProtocolError(f"The sealed input must hold {batch}x{size} float64 values.", ErrorCode.BAD_FIELD)
        state = Request(model_id, request_id, session, batch)
        state.values[0] = np.frombuffer(blob, dtype="<f8").reshape(batch, size)
        self._requests.open(state)
        with _ending_on_failure(self._requests, state):
            index, xs = runtime.advance(state, 0)
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
            last = runtime.accept(state, _form(request.content), request.buffers)
            following, xs = runtime.advance(state, last + 1)
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
