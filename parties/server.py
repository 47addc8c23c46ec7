"""The untrusted server: evaluates every affine layer under CKKS and relays to the enclave.

It holds each deployed model's public context (made by the enclave for that
model alone, with Galois keys for exactly its rotations) and its weights:
ciphertexts by default, plaintexts only when the model owner deployed with
``--weights plain``. It sees layer shapes, sizes and timings, and nothing else.
Everything it hands the enclave is checked there: a server that lies about a
stage, a ciphertext or a result ends the request (``tee.enclave``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from heclave.arith.nonlinear import apply_ops
from heclave.arith.sparse import SparseMatrix
from heclave.arith.values import parse_values
from heclave.graph.model import ModelGraph
from heclave.graph.placement import Form, Placement
from heclave.he.linear import OpCounter
from heclave.protocol.errors import ErrorCode, ForbiddenError, HeclaveError, ProtocolError, QuotaError, UnavailableError
from heclave.protocol.messages import Message, MessageType, batch_size, field_of
from heclave.protocol.streams import Incoming, StreamTable
from heclave.protocol.transport import Client, dispatch

from .bundles import MAX_WEIGHT_BYTES, Bundle, BundleStore
from .executors import Executor
from .worker import check_sizes, split_weights

log = logging.getLogger(__name__)

MAX_PENDING_UPLOADS = 256
PENDING_PER_CLIENT = 8
# What all uploads in progress may declare together: each keeps what arrived until its model is deployed.
MAX_STAGED_BYTES = 4 * MAX_WEIGHT_BYTES


@dataclass
class Deployment:
    """One deployed model: its public graph, its bundle (what a worker installs), and the plaintext or
    field weights of its ``plain`` and ``blinded`` stages, which the server itself applies."""

    graph: ModelGraph
    bundle: Bundle
    matrices: dict[int, SparseMatrix]

    @classmethod
    def of(cls, graph: ModelGraph, bundle: Bundle) -> Deployment:
        matrices = {}
        for i, (stage, (_, frames)) in enumerate(zip(graph.stages, split_weights(graph, bundle.masks, bundle.weights))):
            if stage.placement in (Placement.PLAIN, Placement.BLINDED):
                dtype = "f8" if stage.placement is Placement.PLAIN else "i8"
                matrices[i] = SparseMatrix.from_bytes(frames[0], (stage.layout.rows, stage.layout.cols), dtype)
        return cls(graph, bundle, matrices)


@dataclass
class RequestStats:
    """Where one inference's time and bytes went, as the server saw it."""

    he_ms: float = 0.0
    enclave_ms: float = 0.0
    enclave_offline_ms: float = 0.0
    enclave_rtt_ms: float = 0.0
    enclave_bytes: int = 0
    ops: OpCounter = field(default_factory=OpCounter)

    def to_wire(self) -> dict:
        return {
            "he_ms": self.he_ms,
            "enclave_ms": self.enclave_ms,
            "enclave_offline_ms": self.enclave_offline_ms,
            "enclave_rtt_ms": self.enclave_rtt_ms,
            "enclave_bytes": self.enclave_bytes,
            "rotations": self.ops.rotations,
            "multiplications": self.ops.multiplications,
        }


class Server:
    """Message handler of the server process, shared by its request lanes (see ``parties.serving``).

    Each lane is a thread with its own connection to the enclave; the HE work of
    a lane runs on that lane's worker (``parties.executors``).
    """

    def __init__(
        self,
        enclave_endpoint: str,
        executor: Executor,
        store: BundleStore | None = None,
        enclave_timeout_s: float = 60.0,
        link_token: bytes | None = None,
    ) -> None:
        self.enclave_endpoint, self.enclave_timeout_s = enclave_endpoint, enclave_timeout_s
        # The enclave's CURVE public key, and the server's own pair it allows (``parties.serving``).
        self.link_token = link_token
        self.executor = executor
        self._registered: OrderedDict[str, tuple[ModelGraph, bytes, str]] = OrderedDict()
        self._deployments: dict[str, Deployment] = {}
        self._store = store
        self._streams = StreamTable(MAX_STAGED_BYTES, PENDING_PER_CLIENT)
        self._local = threading.local()
        self._handlers = {
            MessageType.EVIDENCE: self._relay,
            MessageType.OPEN_SESSION: self._relay,
            MessageType.CONFIRM_SESSION: self._relay,
            MessageType.MODEL_INFO: self._relay,
            MessageType.GRANT: self._relay,
            MessageType.UNDEPLOY: self._undeploy,
            MessageType.REGISTER: self._register,
            MessageType.DEPLOY: self._deploy,
            MessageType.PART: self._part,
            MessageType.INFER: self._infer,
        }

    def handle(self, request: Message, lane: int = 0, client: str = "") -> Message:
        """Answer one request on ``lane`` from the transport's ``client`` key; call it from that lane's thread."""
        handlers = {t: functools.partial(h, lane=lane, client=client) for t, h in self._handlers.items()}
        return dispatch(handlers, request, "server")

    def _enclave(self) -> Client:
        # A ZeroMQ socket belongs to one thread: each lane's thread makes its own.
        if not hasattr(self._local, "enclave"):
            self._local.enclave = Client(
                self.enclave_endpoint, timeout_s=self.enclave_timeout_s, link_token=self.link_token
            )
        return self._local.enclave

    def _ask_enclave(self, message: Message, stats: RequestStats | None = None) -> Message:
        enclave = self._enclave()
        before = enclave.bytes_sent + enclave.bytes_received
        started = time.perf_counter()
        try:
            reply = enclave.request(message)
        except UnavailableError:
            raise UnavailableError(
                f"The enclave did not answer within {enclave.timeout_s:.0f} s, so the request was not "
                "completed. Retry in a moment; if this persists, the enclave is down and must be restarted.",
                ErrorCode.ENCLAVE_UNAVAILABLE,
            ) from None
        if stats is not None:
            stats.enclave_rtt_ms += (time.perf_counter() - started) * 1e3
            stats.enclave_ms += float(reply.content.get("enclave_ms", 0.0))
            stats.enclave_offline_ms += float(reply.content.get("enclave_offline_ms", 0.0))
            stats.enclave_bytes += enclave.bytes_sent + enclave.bytes_received - before
        return reply

    def _relay(self, request: Message, lane: int, client: str = "") -> Message:
        reply = self._ask_enclave(Message(request.type, dict(request.content), request.buffers))
        return request.reply(reply.content, reply.buffers)

    def restore(self) -> int:
        """Serve again every bundle the store holds (after a restart); returns how many."""
        if self._store is None:
            return 0
        for bundle in self._store.load_all():
            try:
                self._deployments[bundle.model_id] = Deployment.of(ModelGraph.from_bytes(bundle.graph), bundle)
            except HeclaveError as exc:
                log.error("cannot restore model %s: %s", bundle.model_id, exc.message)
        return len(self._deployments)

    def _register(self, request: Message, lane: int, client: str = "") -> Message:
        """Relay a model owner's registration; keep the graph and the model's public context for its upload,
        which only the same transport client may make."""
        graph_bytes = field_of(request.content, "graph", bytes)
        if sum(1 for *_, who in self._registered.values() if who == client) >= PENDING_PER_CLIENT:
            raise QuotaError(
                f"This client has {PENDING_PER_CLIENT} registered models whose weights never came; upload those "
                "first ('deploy'), or wait until they are forgotten."
            )
        graph = ModelGraph.from_bytes(graph_bytes)
        content = {
            "graph": graph_bytes,
            "session_id": field_of(request.content, "session_id", bytes),
            "sealed_bytes": field_of(request.content, "sealed_bytes", int),
        }
        reply = self._ask_enclave(Message(MessageType.REGISTER_MODEL, content, request.buffers))
        model_id = field_of(reply.content, "model_id", str)
        if len(reply.buffers) != 1:
            raise ProtocolError("The enclave registered a model without its public context.", ErrorCode.INTERNAL)
        self._registered[model_id] = (graph, reply.buffers[0], client)
        # Registrations whose weights never came are forgotten, oldest first, like the enclave's model limit.
        while len(self._registered) > MAX_PENDING_UPLOADS:
            self._registered.popitem(last=False)
        return request.reply(reply.content, reply.buffers)

    def _deploy(self, request: Message, lane: int, client: str = "") -> Message:
        """Begin the upload of a registered model's weights: their sizes, checked against the graph and the
        limit before any of them is kept; the weights follow as ``part`` messages (``protocol.streams``)."""
        model_id = field_of(request.content, "model_id", str)
        graph, _ = self._registration(model_id, client)
        masks = field_of(request.content, "masks", list)
        if request.buffers:
            raise ProtocolError("'deploy' declares the weights' sizes; they follow as parts.", ErrorCode.BAD_FIELD)
        incoming = Incoming(request.content.get("sizes"), MAX_WEIGHT_BYTES, f"weights of model {model_id}")
        check_sizes(graph, masks, incoming.sizes)
        finish = functools.partial(self._commit, model_id, client, masks)
        stream = self._streams.begin(client, model_id, incoming, finish)
        return request.reply({"stream": stream})

    def _part(self, request: Message, lane: int, client: str = "") -> Message:
        return self._streams.part(client, request)

    def _registration(self, model_id: str, client: str) -> tuple[ModelGraph, bytes]:
        """The graph and public context of a model ``client`` registered and has not deployed yet."""
        registered = self._registered.get(model_id)
        if registered is None:
            raise HeclaveError(f"Model {model_id!r} is not registered; register it first.", ErrorCode.UNKNOWN_MODEL)
        graph, context, registrant = registered
        if registrant != client:
            raise ForbiddenError(
                f"Model {model_id!r} was registered by another client; only it may upload the weights."
            )
        return graph, context

    def _commit(self, model_id: str, client: str, masks: list, request: Message, weights: list[bytes]) -> Message:
        """All the weights arrived: the deployment is kept only once every worker installed it and its bundle
        is on disk; anything failing before leaves no bundle and no deployment (the registration stays, so the
        owner may upload again or undeploy)."""
        graph, context = self._registration(model_id, client)
        bundle = Bundle(model_id, graph.to_bytes(), context, masks, weights)
        deployment = Deployment.of(graph, bundle)
        self.executor.install(lambda: bundle)
        try:
            if self._store is not None:
                self._store.save(bundle)
        except BaseException:
            self.executor.uninstall(model_id)
            raise
        self._deployments[model_id] = deployment
        self._registered.pop(model_id, None)
        size = sum(len(w) for w in weights)
        log.info("deployed model %s with %s weights (%d bytes)", model_id, graph.weight_form.value, size)
        return request.reply({"model_id": model_id, "context_mb": len(context) / 1e6})

    def _undeploy(self, request: Message, lane: int, client: str = "") -> Message:
        """Relay an owner's undeploy; once the enclave has removed the model, stop serving its bundle."""
        reply = self._relay(request, lane)
        model_id = field_of(request.content, "model_id", str)
        self._registered.pop(model_id, None)
        self._streams.drop(model_id)
        # Only an id this server serves names a file: the client's string never reaches the filesystem.
        if self._deployments.pop(model_id, None) is not None:
            self.executor.uninstall(model_id)
            if self._store is not None:
                self._store.delete(model_id)
        log.info("undeployed model %s", model_id)
        return reply

    def _deployment(self, content: dict) -> tuple[str, Deployment]:
        model_id = field_of(content, "model_id", str)
        deployment = self._deployments.get(model_id)
        if deployment is None:
            raise HeclaveError(f"Unknown model {model_id!r}; deploy it first.", ErrorCode.UNKNOWN_MODEL)
        return model_id, deployment

    def _infer(self, request: Message, lane: int, client: str = "") -> Message:
        model_id, deployment = self._deployment(request.content)
        stages = deployment.graph.stages
        batch = batch_size(request.content)
        stats = RequestStats()
        ids = {
            "session_id": field_of(request.content, "session_id", bytes),
            "request_id": field_of(request.content, "request_id", str),
        }
        begin = {**ids, "model_id": model_id, "batch": batch, "envelope": field_of(request.content, "envelope", bytes)}
        reply = self._ask_enclave(Message(MessageType.BEGIN, begin), stats)
        while "result" not in reply.content:
            index = field_of(reply.content, "next", int)
            if not 0 <= index < len(stages):
                raise ProtocolError(f"The enclave handed out stage {index}, which the model lacks.", ErrorCode.INTERNAL)
            # The first he stage's ciphertexts are the data owner's; the enclave hands out no others for it.
            frames = list(request.buffers) if index == 0 and stages[0].placement is Placement.HE else reply.buffers
            form, outputs = self._server_stage(lane, model_id, deployment, index, list(frames), batch, stats)
            reply = self._ask_enclave(
                Message(MessageType.ACTIVATE, {**ids, "stage": index, "form": form}, outputs), stats
            )
        return request.reply({"result": reply.content["result"], "stats": stats.to_wire()})

    def _server_stage(
        self,
        lane: int,
        model_id: str,
        deployment: Deployment,
        index: int,
        frames: list[bytes],
        batch: int,
        stats: RequestStats,
    ) -> tuple[str, list[bytes]]:
        """Run the server's part from stage ``index``: what to hand the enclave, in which form."""
        stages = deployment.graph.stages
        stage = stages[index]
        if stage.placement is Placement.HE:
            outputs, ops = self.executor.evaluate(lane, model_id, index, frames, batch, lambda: deployment.bundle)
            stats.ops.add(ops)
            # The worker's own time: the hop to it is transport, as the enclave's hop is.
            stats.he_ms += ops.ms
            return Form.PARTIALS.value, outputs
        started = time.perf_counter()
        result = self._clear_stages(deployment, index, frames, batch)
        stats.he_ms += (time.perf_counter() - started) * 1e3
        return result

    def _clear_stages(
        self, deployment: Deployment, index: int, frames: list[bytes], batch: int
    ) -> tuple[str, list[bytes]]:
        """A ``blinded`` stage, or a run of ``plain`` stages, computed here in the server process."""
        stages = deployment.graph.stages
        g = stages[index].layout
        if stages[index].placement is Placement.BLINDED:
            blinded = parse_values(frames, "<i8", (batch, g.cols), "blinded input")
            w_q = deployment.matrices[index]
            out = np.stack([w_q.apply_mod(row) for row in blinded])
            return Form.BLINDED.value, [out.astype("<i8").tobytes()]
        xs = parse_values(frames, "<f8", (batch, g.cols - 1), "plain activation")
        for stage in range(index, deployment.graph.plain_run_end(index) + 1):  # their nonlinear steps too
            ys = deployment.matrices[stage].apply(np.concatenate([xs, np.ones((batch, 1))], axis=1))
            xs = np.stack([apply_ops(y, stages[stage].ops) for y in ys])
        return Form.PLAIN.value, [np.ascontiguousarray(xs, dtype="<f8").tobytes()]
