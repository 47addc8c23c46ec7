"""The untrusted server: evaluates every affine layer under CKKS and relays to the enclave.

It holds the public context, the Galois keys the enclave issued for each
deployed model, and each model's weights: ciphertexts by default, plaintexts
only when the model owner deployed with ``--weights plain``. It sees layer
shapes, sizes and timings, and nothing else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from he.context import PublicContext
from he.graph import ModelGraph
from he.linear import LinearKernel, OpCounter, WeightForm
from he.serialize import to_bytes
from protocol.errors import CiphertextError, ErrorCode, HeclaveError, PlanError, ProtocolError, UnavailableError
from protocol.messages import Message, batch_size, field_of
from protocol.transport import Client, dispatch

from .bundles import Bundle, BundleStore

log = logging.getLogger(__name__)


@dataclass
class Deployment:
    """One deployed model on the server: its graph, context with Galois keys, and kernels."""

    graph: ModelGraph
    context: PublicContext
    kernels: list[LinearKernel]


@dataclass
class RequestStats:
    """Where one inference's time and bytes went, as the server saw it."""

    he_ms: float = 0.0
    enclave_ms: float = 0.0
    enclave_rtt_ms: float = 0.0
    enclave_bytes: int = 0
    ops: OpCounter = field(default_factory=OpCounter)

    def to_wire(self) -> dict:
        return {
            "he_ms": self.he_ms,
            "enclave_ms": self.enclave_ms,
            "enclave_rtt_ms": self.enclave_rtt_ms,
            "enclave_bytes": self.enclave_bytes,
            "rotations": self.ops.rotations,
            "multiplications": self.ops.multiplications,
        }


class Server:
    """Message handler of the server process; the transport loop lives in ``parties.cli``."""

    def __init__(self, enclave: Client, store: BundleStore | None = None) -> None:
        self.enclave = enclave
        self._base: PublicContext | None = None
        self._deployments: dict[str, Deployment] = {}
        self._store = store
        self._handlers = {
            "evidence": self._relay,
            "open_session": self._relay,
            "deploy": self._deploy,
            "model_info": self._model_info,
            "infer": self._infer,
        }

    def handle(self, request: Message) -> Message:
        return dispatch(self._handlers, request, "server")

    def _ask_enclave(self, message: Message, stats: RequestStats | None = None) -> Message:
        before = self.enclave.bytes_sent + self.enclave.bytes_received
        started = time.perf_counter()
        try:
            reply = self.enclave.request(message)
        except UnavailableError:
            raise UnavailableError(
                f"The enclave did not answer within {self.enclave.timeout_s:.0f} s, so the request was not "
                "completed. Retry in a moment; if this persists, the enclave is down and must be restarted.",
                ErrorCode.ENCLAVE_UNAVAILABLE,
            ) from None
        if stats is not None:
            stats.enclave_rtt_ms += (time.perf_counter() - started) * 1e3
            stats.enclave_ms += float(reply.content.get("enclave_ms", 0.0))
            stats.enclave_bytes += self.enclave.bytes_sent + self.enclave.bytes_received - before
        return reply

    def _relay(self, request: Message) -> Message:
        reply = self._ask_enclave(Message(request.type, dict(request.content), request.buffers))
        return request.reply(reply.content, reply.buffers)

    def _public(self) -> PublicContext:
        if self._base is None:
            reply = self._ask_enclave(Message("evidence"))
            self._base = PublicContext.from_bytes(reply.buffers[0])
        return self._base

    def restore(self) -> int:
        """Serve again every bundle the store holds (after a restart); returns how many."""
        if self._store is None:
            return 0
        for bundle in self._store.load_all():
            try:
                graph = ModelGraph.from_bytes(bundle.graph)
                self._install(bundle, graph, self._kernels(graph, self._public(), bundle.masks, list(bundle.weights)))
            except HeclaveError as exc:
                log.error("cannot restore model %s: %s", bundle.model_id, exc.message)
        return len(self._deployments)

    def _install(self, bundle: Bundle, graph: ModelGraph, kernels: list[LinearKernel]) -> None:
        context = self._public().with_galois(bundle.galois_keys, bundle.galois_steps)
        self._deployments[bundle.model_id] = Deployment(graph, context, kernels)

    def _deploy(self, request: Message) -> Message:
        graph_bytes = field_of(request.content, "graph", bytes)
        graph = ModelGraph.from_bytes(graph_bytes)
        masks = field_of(request.content, "masks", list)
        # The weights are checked before the enclave registers anything.
        kernels = self._kernels(graph, self._public(), masks, list(request.buffers))
        reply = self._ask_enclave(
            Message(
                "register_model",
                {
                    "graph": graph_bytes,
                    "session_id": field_of(request.content, "session_id", bytes),
                    "envelope": field_of(request.content, "envelope", bytes),
                },
            )
        )
        model_id = str(reply.content["model_id"])
        bundle = Bundle(model_id, graph_bytes, reply.buffers[0], list(reply.content["galois_steps"]), masks,
                        list(request.buffers))
        self._install(bundle, graph, kernels)
        if self._store is not None:
            self._store.save(bundle)
        log.info("deployed model %s with %s weights", model_id, graph.weight_form.value)
        return request.reply({"model_id": model_id, "galois_mb": len(reply.buffers[0]) / 1e6})

    def _kernels(
        self, graph: ModelGraph, context: PublicContext, masks: list, buffers: list[bytes]
    ) -> list[LinearKernel]:
        kernels = []
        for i, stage in enumerate(graph.stages):
            g = stage.geometry
            if graph.weight_form is WeightForm.PLAIN:
                if len(buffers) <= i or len(buffers[i]) != g.rows * g.cols * 8:
                    raise PlanError(f"Stage {i} needs a {g.rows}x{g.cols} float64 weight matrix.")
                weights = np.frombuffer(buffers[i], dtype="<f8").reshape(g.rows, g.cols)
                kernels.append(LinearKernel.from_plain(context.toolkit, g, weights))
                continue
            if len(masks) != len(graph.stages) or not isinstance(masks[i], bytes):
                raise ProtocolError("Encrypted deployments carry one packed diagonal mask per stage.", ErrorCode.BAD_FIELD)
            shape = (g.out_cts, g.in_cts, g.k)
            bits = np.unpackbits(np.frombuffer(masks[i], dtype=np.uint8))
            if bits.size < int(np.prod(shape)):
                raise PlanError(f"Stage {i}'s diagonal mask is too short for its geometry.")
            mask = bits[: int(np.prod(shape))].reshape(shape).astype(bool)
            count = int(mask.sum())
            kernels.append(LinearKernel.from_encrypted(context.toolkit, g, mask, buffers[:count]))
            buffers = buffers[count:]
        return kernels

    def _deployment(self, content: dict) -> tuple[str, Deployment]:
        model_id = field_of(content, "model_id", str)
        deployment = self._deployments.get(model_id)
        if deployment is None:
            raise HeclaveError(f"Unknown model {model_id!r}; deploy it first.", ErrorCode.UNKNOWN_MODEL)
        return model_id, deployment

    def _model_info(self, request: Message) -> Message:
        _, deployment = self._deployment(request.content)
        return request.reply({"graph": deployment.graph.to_bytes()})

    def _infer(self, request: Message) -> Message:
        model_id, deployment = self._deployment(request.content)
        batch = batch_size(request.content)
        stats = RequestStats()
        toolkit = deployment.context.toolkit
        inputs = [toolkit.load_ciphertext(b, "input") for b in request.buffers]
        last = len(deployment.kernels) - 1
        for index, kernel in enumerate(deployment.kernels):
            started = time.perf_counter()
            frames = [to_bytes(ct) for ct in self._evaluate(kernel, inputs, batch, deployment.context, stats)]
            stats.he_ms += (time.perf_counter() - started) * 1e3
            content = {"model_id": model_id, "stage": index, "batch": batch}
            if index == last:
                content |= {
                    "session_id": field_of(request.content, "session_id", bytes),
                    "request_id": field_of(request.content, "request_id", str),
                    "envelope": field_of(request.content, "envelope", bytes),
                }
            reply = self._ask_enclave(Message("activate", content, frames), stats)
            if index == last:
                return request.reply({"result": reply.content["result"], "stats": stats.to_wire()})
            started = time.perf_counter()
            inputs = [toolkit.load_ciphertext(b, "re-encrypted activation") for b in reply.buffers]
            stats.he_ms += (time.perf_counter() - started) * 1e3
        raise PlanError("The deployed model has no layers.")

    @staticmethod
    def _evaluate(kernel: LinearKernel, inputs: list, batch: int, context: PublicContext, stats: RequestStats) -> list:
        """One layer over every ciphertext group of the batch."""
        g = kernel.geometry
        if len(inputs) != g.groups(batch) * g.in_cts:
            raise CiphertextError(
                f"A batch of {batch} needs {g.groups(batch) * g.in_cts} input ciphertexts, got {len(inputs)}."
            )
        outputs = []
        for start in range(0, len(inputs), g.in_cts):
            outputs += kernel.evaluate(inputs[start : start + g.in_cts], context, stats.ops)
        return outputs
