"""HE workers: hold deployed models' kernels and evaluate one layer at a time.

A worker receives only public material: a model's public CKKS context (with
the Galois keys the enclave issued for it) and its weights in the form the
owner chose. The same :class:`HeWorker` runs inside the server process, as a
worker process of its own (``python -m heclave.parties.worker``, speaking heclave's
protocol over loopback) or inside a Ray actor; the server's request pipeline
does not care which.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

from heclave.graph.model import ModelGraph
from heclave.graph.placement import Placement, WeightForm
from heclave.he.context import PublicContext, Toolkit
from heclave.he.linear import LinearKernel, OpCounter, unpack_mask
from heclave.he.serialize import to_bytes
from heclave.protocol import service
from heclave.protocol.errors import CiphertextError, ErrorCode, HeclaveError, PlanError, ProtocolError
from heclave.protocol.messages import Message, MessageType, batch_size, field_of
from heclave.protocol.streams import Incoming, StreamTable
from heclave.protocol.transport import dispatch, router, serve

from .bundles import MAX_BUNDLE_BYTES, Bundle

log = logging.getLogger(__name__)

NOT_INSTALLED = "not installed on this worker"
OPTIONS = service.options("tcp://127.0.0.1:*", "Endpoint the server connects to.", "{endpoint}")


def stage_items(graph: ModelGraph, masks: list) -> list[tuple[np.ndarray | None, int]]:
    """How many weight items each stage of a deployment carries, with each encrypted ``he`` stage's mask.

    ``he`` stages carry a float64 matrix (plain weights) or one ciphertext per
    nonzero diagonal; ``plain`` stages a sparse float64 matrix; ``blinded`` stages
    a sparse matrix of field integers; ``enclave`` stages nothing (their weights
    go to the enclave only).
    """
    if len(masks) != len(graph.stages) or not all(isinstance(m, bytes) for m in masks):
        raise ProtocolError("A deployment carries one packed diagonal mask per stage.", ErrorCode.BAD_FIELD)
    out: list[tuple[np.ndarray | None, int]] = []
    for i, stage in enumerate(graph.stages):
        if stage.placement is Placement.ENCLAVE:
            out.append((None, 0))
        elif stage.placement is not Placement.HE or graph.weight_form is WeightForm.PLAIN:
            out.append((None, 1))
        else:
            mask = unpack_mask(masks[i], stage.layout, f"Stage {i}")
            out.append((mask, int(mask.sum())))
    return out


def check_sizes(graph: ModelGraph, masks: list, sizes: list[int]) -> None:
    """Refuse weight items (given by their sizes, as a deployment declares them before sending any) that do not
    fit the graph: another number than its stages use, or a plain-weight matrix of another shape."""
    counts = stage_items(graph, masks)
    needed = sum(count for _, count in counts)
    if len(sizes) != needed:
        each = ", ".join(
            f"stage {i}: {count} {'encrypted diagonals' if mask is not None else 'matrix' if count else 'none'}"
            for i, (mask, count) in enumerate(counts)
        )
        raise PlanError(
            f"The deployment carries {len(sizes)} weight items; its stages need {needed} ({each}). "
            "Upload the weights of the plan that was registered."
        )
    start = 0
    for i, (stage, (mask, count)) in enumerate(zip(graph.stages, counts)):
        g = stage.layout
        if stage.placement is Placement.HE and mask is None and sizes[start] != g.rows * g.cols * 8:
            raise PlanError(f"Stage {i} needs a {g.rows}x{g.cols} matrix of 8-byte numbers.")
        start += count


def split_weights(graph: ModelGraph, masks: list, weights: list[bytes]) -> list[tuple[np.ndarray | None, list[bytes]]]:
    """A deployment's server-side weight items, stage by stage (:func:`stage_items`), with each encrypted
    ``he`` stage's diagonal mask."""
    check_sizes(graph, masks, [len(w) for w in weights])
    out: list[tuple[np.ndarray | None, list[bytes]]] = []
    start = 0
    for mask, count in stage_items(graph, masks):
        out.append((mask, weights[start : start + count]))
        start += count
    return out


def build_kernels(graph: ModelGraph, toolkit: Toolkit, masks: list, weights: list[bytes]) -> list[LinearKernel | None]:
    """The kernel of every ``he`` stage (``None`` elsewhere), refusing weights that do not fit the graph."""
    kernels: list[LinearKernel | None] = []
    for stage, (mask, frames) in zip(graph.stages, split_weights(graph, masks, weights)):
        g = stage.layout
        if stage.placement is not Placement.HE:
            kernels.append(None)
        elif mask is None:
            matrix = np.frombuffer(frames[0], dtype="<f8").reshape(g.rows, g.cols)
            kernels.append(LinearKernel.from_plain(toolkit, g, matrix))
        else:
            kernels.append(LinearKernel.from_encrypted(toolkit, g, mask, frames))
    return kernels


@dataclass
class _Installed:
    context: PublicContext
    kernels: list[LinearKernel | None]


class HeWorker:
    """Deployed models' kernels, and the evaluation of one stage for a batch of ciphertext groups."""

    def __init__(self) -> None:
        self._models: dict[str, _Installed] = {}

    def has(self, model_id: str) -> bool:
        return model_id in self._models

    def install(self, bundle: Bundle) -> None:
        """Prepare a model's kernels (plaintext diagonals encoded, ciphertexts loaded) once."""
        context = PublicContext.from_bytes(bundle.context)
        graph = ModelGraph.from_bytes(bundle.graph)
        kernels = build_kernels(graph, context.toolkit, bundle.masks, list(bundle.weights))
        self._models[bundle.model_id] = _Installed(context, kernels)

    def uninstall(self, model_id: str) -> None:
        """Forget a model's kernels (undeployed, or its deployment failed); nothing if it is not here."""
        self._models.pop(model_id, None)

    def evaluate(self, model_id: str, stage: int, inputs: list[bytes], batch: int) -> tuple[list[bytes], OpCounter]:
        """One layer over every ciphertext group of a batch: serialised outputs and the operations done."""
        installed = self._models.get(model_id)
        if installed is None:
            raise HeclaveError(f"Model {model_id!r} is {NOT_INSTALLED}.", ErrorCode.UNKNOWN_MODEL)
        if not 0 <= stage < len(installed.kernels) or installed.kernels[stage] is None:
            raise ProtocolError(f"Stage {stage} is not an encrypted stage of the model.", ErrorCode.BAD_FIELD)
        kernel = installed.kernels[stage]
        g = kernel.layout
        if len(inputs) != g.groups(batch) * g.in_cts:
            raise CiphertextError(
                f"A batch of {batch} needs {g.groups(batch) * g.in_cts} input ciphertexts, got {len(inputs)}."
            )
        started = time.perf_counter()
        toolkit, ops, outputs = installed.context.toolkit, OpCounter(), []
        cts = [toolkit.load_ciphertext(b, "input" if stage == 0 else "re-encrypted activation") for b in inputs]
        for start in range(0, len(cts), g.in_cts):
            outputs += kernel.evaluate(cts[start : start + g.in_cts], installed.context, ops)
        frames = [to_bytes(ct) for ct in outputs]
        ops.ms = (time.perf_counter() - started) * 1e3
        return frames, ops


class WorkerService:
    """A worker process's message handler: ``install`` (a bundle, streamed in parts), ``uninstall`` and
    ``evaluate``. Only its server reaches it."""

    def __init__(self) -> None:
        self.worker = HeWorker()
        # Each lane installs one model at a time, and a deployment installs on every worker at once.
        self._streams = StreamTable(capacity=2 * MAX_BUNDLE_BYTES)
        self._handlers = {
            MessageType.INSTALL: self._install,
            MessageType.PART: functools.partial(self._streams.part, ""),
            MessageType.UNINSTALL: self._uninstall,
            MessageType.EVALUATE: self._evaluate,
        }

    def handle(self, request: Message) -> Message:
        return dispatch(self._handlers, request, "worker")

    def _install(self, request: Message) -> Message:
        """Begin receiving a model's bundle: its items' sizes first; the model is installed on the last part."""
        model_id = field_of(request.content, "model_id", str)
        masks = field_of(request.content, "masks", list)
        incoming = Incoming(request.content.get("sizes"), MAX_BUNDLE_BYTES, f"bundle of model {model_id}")

        def finish(part: Message, items: list[bytes]) -> Message:
            self.worker.install(Bundle.of_items(model_id, masks, items))
            return part.reply({"model_id": model_id})

        return request.reply({"stream": self._streams.begin("", model_id, incoming, finish)})

    def _uninstall(self, request: Message) -> Message:
        self.worker.uninstall(field_of(request.content, "model_id", str))
        return request.reply()

    def _evaluate(self, request: Message) -> Message:
        outputs, ops = self.worker.evaluate(
            field_of(request.content, "model_id", str),
            field_of(request.content, "stage", int),
            list(request.buffers),
            batch_size(request.content),
        )
        return request.reply({"ops": ops.__dict__}, outputs)


def main(argv: list[str] | None = None) -> int:
    args = service.parser("python -m heclave.parties.worker", "A heclave HE worker process.", OPTIONS).parse_args(argv)
    service.configure_logging(label="worker")
    sock, endpoint = router(args.bind)
    should_stop = service.stop_requested(args.exit_with_parent)
    service.write_ready(args.ready_file, endpoint=endpoint)
    serve(sock, WorkerService().handle, should_stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
