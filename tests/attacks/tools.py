"""The malicious server operator's tools, against the real enclave and server processes.

The operator runs the server, so it holds everything the server holds (each
deployed model's bundle on the server's disk: graph, public context, encrypted
weights), can run the server's own HE worker on anything, and can talk to the
enclave's socket directly, driving ``begin``/``activate`` however it likes. It
can also be a data owner or a model owner itself, and run a server of its own
making. What it must never get is a secret (a key, weights, someone's input
or output), and an honest data owner must never get anything but the honest
computation's result.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from heclave.arith.nonlinear import apply_ops
from heclave.graph.model import ModelGraph
from heclave.graph.placement import Placement
from heclave.he.context import PublicContext
from heclave.parties.bundles import SUFFIX, Bundle
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster
from heclave.parties.server import Deployment
from heclave.parties.worker import HeWorker
from heclave.plan import Plan
from heclave.protocol.errors import ErrorCode, HeclaveError, ProtocolError
from heclave.protocol.identity import Identity
from heclave.protocol.messages import Message
from heclave.protocol.transport import Client, CurveKeys, handle_frames, router, write_public_key
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, undeploy

from .forge import parse_output

INPUT = 16
ATTACKER = Identity.generate()
"""The operator's own identity as a data owner. The suite's models name it as a reader, the strongest case:
a model owner who lets the operator query its model."""


@dataclass
class Deployed:
    """A model deployed through the real server, with what its model owner knows about it."""

    model_id: str
    net: torch.nn.Module
    plan: Plan

    @property
    def inputs(self) -> int:
        return int(np.prod(self.plan.graph.input_shape))

    def reference(self, xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.from_numpy(np.atleast_2d(xs))).numpy()


def assert_close(released: dict, want: np.ndarray) -> None:
    """Released logits agree with plaintext, up to the flooding noise the release says it carries."""
    got = np.asarray(released["logits"])
    tolerance = max(1e-3, 8 * float(released.get("noise_sd", 0.0)))
    assert np.abs(got - want).max() < tolerance, (got, want, tolerance)


def deploy(cluster, net: torch.nn.Module, input_shape: tuple[int, ...] = (INPUT,), **options) -> Deployed:
    """Plan and deploy ``net`` (encrypted weights) as an honest model owner would."""
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    try:
        plan = owner.plan(net, input_shape, "encrypted", **options)
        model_id = owner.deploy(plan, readers=[DATA_OWNER.public, ATTACKER.public])
    finally:
        owner.close()
    return Deployed(model_id, net.double().eval(), plan)


def deployed(cluster, net: torch.nn.Module, input_shape: tuple[int, ...] = (INPUT,), **options) -> Iterator[Deployed]:
    """:func:`deploy` for a fixture (``yield from deployed(...)``): undeploys the model when the fixture ends."""
    model = deploy(cluster, net, input_shape, **options)
    yield model
    undeploy(cluster, model.model_id)


def two_layers(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(INPUT, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


class Operator:
    """The server operator: the real server's bundles from its disk, the server's HE worker, the enclave's socket."""

    def __init__(self, cluster) -> None:
        self.models_dir = Path(cluster.workdir) / "server-state" / "models"
        self.enclave = cluster.enclave_client(timeout_s=60)
        self.worker = HeWorker()
        self._bundles: dict[str, Bundle] = {}
        self._contexts: dict[str, PublicContext] = {}

    def bundle(self, model_id: str) -> Bundle:
        """A deployed model's bundle as the real server stored it, installed on the operator's worker."""
        if model_id not in self._bundles:
            path = self.models_dir / f"{model_id}{SUFFIX}"
            bundle = Bundle.from_bytes(path.read_bytes(), path)
            self.worker.install(bundle)
            self._bundles[model_id] = bundle
        return self._bundles[model_id]

    def context(self, model_id: str) -> PublicContext:
        """The model's public context (its own public key, relinearization and Galois keys)."""
        if model_id not in self._contexts:
            self._contexts[model_id] = PublicContext.from_bytes(self.bundle(model_id).context)
        return self._contexts[model_id]

    def graph(self, model_id: str) -> ModelGraph:
        return ModelGraph.from_bytes(self.bundle(model_id).graph)

    def layer(self, model_id: str, stage: int, inputs: list[bytes], batch: int = 1) -> list[bytes]:
        """The server's honest result for a stage on what the enclave handed out for it (as ``Server`` computes
        it: an ``he`` stage on the HE worker, a ``blinded`` stage or a run of ``plain`` stages in the clear)."""
        bundle = self.bundle(model_id)
        stages = self.graph(model_id).stages
        placement = stages[stage].placement
        if placement is Placement.HE:
            return self.worker.evaluate(model_id, stage, list(inputs), batch)[0]
        matrix = Deployment.of(self.graph(model_id), bundle).matrices
        if placement is Placement.BLINDED:
            blinded = np.frombuffer(inputs[0], dtype="<i8").reshape(batch, -1)
            return [np.stack([matrix[stage].apply_mod(row) for row in blinded]).astype("<i8").tobytes()]
        xs = np.frombuffer(inputs[0], dtype="<f8").reshape(batch, -1)
        for index in range(stage, self.graph(model_id).plain_run_end(stage) + 1):
            ys = matrix[index].apply(np.concatenate([xs, np.ones((batch, 1))], axis=1))
            xs = np.stack([apply_ops(y, stages[index].ops) for y in ys])
        return [np.ascontiguousarray(xs, dtype="<f8").tobytes()]

    def ask(self, kind: str, content: dict, buffers: list[bytes] | tuple[bytes, ...] = ()) -> Message:
        return self.enclave.request(Message(kind, content, list(buffers)))

    def begin(self, owner: DataOwner, model: Deployed | str, xs: np.ndarray) -> Probe:
        """A request the data owner authorised (through ``prepare``), opened at the enclave by the operator."""
        model_id = model if isinstance(model, str) else model.model_id
        xs = np.atleast_2d(np.asarray(xs, dtype=np.float64))
        probe = Probe(self, owner, model_id, xs, owner.prepare(model_id, xs))
        probe.took(self.ask("begin", dict(probe.infer.content)))
        return probe

    def close(self) -> None:
        self.enclave.close()


@dataclass
class Probe:
    """One request the operator drives stage by stage on the enclave's socket, as a (malicious) server."""

    operator: Operator
    owner: DataOwner
    model_id: str
    xs: np.ndarray
    infer: Message
    expected: int = -1
    handout: list[bytes] = field(default_factory=list)
    result: bytes | None = None

    @property
    def request_id(self) -> str:
        return self.infer.content["request_id"]

    @property
    def ids(self) -> dict:
        return {"session_id": self.infer.content["session_id"], "request_id": self.request_id}

    @property
    def context(self) -> PublicContext:
        return self.operator.context(self.model_id)

    def took(self, reply: Message) -> None:
        """Record the enclave's answer: the next stage and its input, or the sealed result."""
        if "result" in reply.content:
            self.result = reply.content["result"]
            return
        self.expected = reply.content["next"]
        # The first he stage's inputs are the data owner's ciphertexts; the enclave hands out none.
        self.handout = list(self.infer.buffers) if self.expected == 0 and not reply.buffers else list(reply.buffers)

    def honest(self) -> list[bytes]:
        """The server's honest result for the stage the enclave expects."""
        return self.operator.layer(self.model_id, self.expected, self.handout, len(self.xs))

    @property
    def form(self) -> str:
        """The form the result of the expected stage takes (as the server sends it)."""
        placement = self.operator.graph(self.model_id).stages[self.expected].placement
        return {Placement.HE: "partials", Placement.BLINDED: "blinded", Placement.PLAIN: "plain"}[placement]

    def activate(self, frames: list[bytes], stage: int | None = None, form: str | None = None) -> Message:
        content = {**self.ids, "stage": self.expected if stage is None else stage, "form": form or self.form}
        reply = self.operator.ask("activate", content, frames)
        self.took(reply)
        return reply

    def step(self) -> Message:
        return self.activate(self.honest())

    def run(self) -> list[dict]:
        """Finish the request honestly and open the release as its data owner."""
        while self.result is None:
            self.step()
        return self.released()

    def released(self) -> list[dict]:
        opened = self.owner.connection.session.open(self.result, b"result:" + self.request_id.encode())
        return msgpack.unpackb(opened, raw=False)["results"]

    def logits(self) -> np.ndarray:
        return np.asarray([r["logits"] for r in self.run()])

    def refused(
        self, frames: list[bytes], code: ErrorCode, stage: int | None = None, form: str | None = None
    ) -> HeclaveError:
        """Send ``frames`` as a stage's result: it must be refused with ``code``, and the request must be over."""
        with pytest.raises(HeclaveError) as info:
            self.activate(frames, stage, form)
        assert info.value.code == code, info.value.message
        assert self.result is None
        self.assert_ended()
        return info.value

    def assert_ended(self) -> None:
        """The request is gone: not even the honest result of its expected stage gets anything out now."""
        with pytest.raises(HeclaveError) as info:
            self.activate(self.honest())
        assert info.value.code == ErrorCode.UNKNOWN_REQUEST, info.value.message
        assert self.result is None


class LyingServer:
    """A server of the operator's own making: relays owners to the real enclave, rewriting what it likes.

    ``rewrite`` changes a ``model_info`` request before it goes to the enclave,
    ``tamper`` the enclave's reply (content and buffers) before the owner gets
    it. It serves ``evidence``, the two handshake messages and ``model_info`` only, and
    records the type of every message an owner sent it.
    """

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        tamper: Callable[[dict, list[bytes]], tuple[dict, list[bytes]]] | None = None,
        rewrite: Callable[[Message], Message] | None = None,
    ) -> None:
        self.tamper, self.rewrite = tamper, rewrite
        self.received: list[str] = []
        curve = CurveKeys.generate()
        self.key_file = workdir / f"liar-{secrets.token_hex(4)}.key"
        write_public_key(self.key_file, curve.public)
        self._cluster = cluster
        self._sock, self.endpoint = router("tcp://127.0.0.1:*", curve)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="lying-server")
        self._thread.start()

    def _serve(self) -> None:
        enclave = self._cluster.enclave_client(timeout_s=60)
        try:
            while not self._stop.is_set():
                if not self._sock.poll(50):
                    continue
                identity, *frames = self._sock.recv_multipart()
                reply = handle_frames(frames, lambda request: self._handle(enclave, request))
                self._sock.send_multipart([identity, *reply])
        finally:
            enclave.close()
            self._sock.close(linger=0)

    def _handle(self, enclave: Client, request: Message) -> Message:
        self.received.append(request.type)
        if request.type not in ("evidence", "open_session", "confirm_session", "model_info"):
            raise ProtocolError(f"This server does not handle {request.type!r}.", ErrorCode.UNKNOWN_TYPE)
        relayed = Message(request.type, dict(request.content), list(request.buffers))
        if self.rewrite is not None and request.type == "model_info":
            relayed = self.rewrite(relayed)
        reply = enclave.request(relayed)
        content, buffers = dict(reply.content), list(reply.buffers)
        if self.tamper is not None and request.type == "model_info":
            content, buffers = self.tamper(content, buffers)
        return request.reply(content, buffers)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def random_input(model: Deployed | None = None) -> np.ndarray:
    """A random input; for ``model``, one that leaves every later stage an input with a clearly nonzero entry
    (after a ReLU it can be all zero, and then any weights give the same result)."""
    rng = np.random.default_rng()
    while True:
        x = rng.normal(size=INPUT if model is None else model.inputs)
        if model is None or all(stage_input(model, x, s).max() > 0.2 for s in range(1, len(model.plan.weights))):
            return x


def stage_input(model: Deployed, x: np.ndarray, stage: int) -> np.ndarray:
    """What the enclave hands out for ``stage`` (the test knows the weights; the server does not)."""
    h = x
    for w in model.plan.weights[:stage]:
        h = np.maximum(w[:, :-1] @ h + w[:, -1], 0.0)
    return h


def run_to(probe: Probe, stage: int) -> Probe:
    """Run the request honestly up to ``stage`` (its input handed out, its result not yet sent)."""
    while probe.expected < stage:
        probe.step()
    assert probe.expected == stage and probe.result is None
    return probe


def output_polynomials(probe: Probe) -> int:
    """Polynomials per output ciphertext of the expected stage (an encrypted-weight layer may leave three)."""
    return len(parse_output(probe.context, probe.honest()[0]).data)
