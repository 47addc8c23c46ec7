"""Where the server's HE work runs: in its own process, in local worker processes, or on Ray.

The server runs one request pipeline per *lane*; each lane evaluates its layers
on a worker of its own, so independent requests proceed in parallel while the
enclave (one process) serves them all. A model is shipped to a lane's worker
the first time that lane needs it, and only once: its bundle holds public
material only (the model's public context, weights in the owner's form).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from heclave.he.linear import OpCounter
from heclave.protocol.messages import Message, MessageType
from heclave.protocol.transport import Client

from .bundles import Bundle
from .processes import Child
from .worker import HeWorker

log = logging.getLogger(__name__)

BundleSource = Callable[[], Bundle]
"""Returns a model's bundle, when a worker must install it."""


class Executor(ABC):
    """Evaluates one stage of one request on the worker of a lane."""

    lanes: int

    @abstractmethod
    def evaluate(
        self, lane: int, model_id: str, stage: int, inputs: list[bytes], batch: int, source: BundleSource
    ) -> tuple[list[bytes], OpCounter]:
        """Serialised outputs of the stage and the homomorphic operations it took."""

    def close(self) -> None:
        """Stop whatever workers the executor started."""


class InlineExecutor(Executor):
    """One lane, evaluated in the server process itself."""

    lanes = 1

    def __init__(self) -> None:
        self._worker = HeWorker()

    def evaluate(
        self, lane: int, model_id: str, stage: int, inputs: list[bytes], batch: int, source: BundleSource
    ) -> tuple[list[bytes], OpCounter]:
        if not self._worker.has(model_id):
            self._worker.install(source())
        return self._worker.evaluate(model_id, stage, inputs, batch)


class ProcessExecutor(Executor):
    """One worker process per lane on this machine, reached over loopback with heclave's protocol."""

    def __init__(self, lanes: int, workdir: Path, timeout_s: float = 120.0) -> None:
        self.lanes = lanes
        workdir.mkdir(parents=True, exist_ok=True)
        self._children = [
            Child(f"worker-{i}", ["heclave.parties.worker", "--exit-with-parent"], workdir) for i in range(lanes)
        ]
        self._endpoints = [child.wait_ready()["endpoint"] for child in self._children]
        self._timeout_s = timeout_s
        self._local = threading.local()

    def _lane(self, lane: int) -> tuple[Client, set[str]]:
        # A ZeroMQ socket belongs to one thread: each lane's thread makes its own.
        clients = self._local.__dict__.setdefault("clients", {})
        if lane not in clients:
            clients[lane] = (Client(self._endpoints[lane], timeout_s=self._timeout_s), set())
        return clients[lane]

    def evaluate(
        self, lane: int, model_id: str, stage: int, inputs: list[bytes], batch: int, source: BundleSource
    ) -> tuple[list[bytes], OpCounter]:
        client, installed = self._lane(lane)
        if model_id not in installed:
            client.request(Message(MessageType.INSTALL, {"model_id": model_id}, [source().to_bytes()]))
            installed.add(model_id)
        content = {"model_id": model_id, "stage": stage, "batch": batch}
        reply = client.request(Message(MessageType.EVALUATE, content, inputs))
        return list(reply.buffers), OpCounter(**reply.content["ops"])

    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children]

    def close(self) -> None:
        for child in self._children:
            child.stop()
