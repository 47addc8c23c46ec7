"""Where the server's HE work runs: in its own process, in local worker processes, or on Ray.

The server runs one request pipeline per *lane*; each lane evaluates its layers
on a worker of its own, so independent requests proceed in parallel while the
enclave (one process) serves them all. A deployment is complete only once every
lane's worker has installed its model (:meth:`Executor.install`); a model the
server restored from disk is shipped to a lane's worker the first time that
lane needs it. A bundle holds public material only (the model's public context,
weights in the owner's form), and goes to a worker process as a stream of
bounded parts (``protocol.streams``), never as one buffer.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from heclave.he.linear import OpCounter
from heclave.protocol import streams
from heclave.protocol.errors import HeclaveError
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
    def install(self, source: BundleSource) -> None:
        """Install a model on every lane's worker, or raise what a worker refused (and leave it on none)."""

    @abstractmethod
    def uninstall(self, model_id: str) -> None:
        """Forget a model on every worker (undeployed, or its deployment failed); never raises for one."""

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

    def install(self, source: BundleSource) -> None:
        self._worker.install(source())

    def uninstall(self, model_id: str) -> None:
        self._worker.uninstall(model_id)

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
        self._installed: list[set[str]] = [set() for _ in range(lanes)]
        self._lock = threading.Lock()

    def _lane(self, lane: int) -> Client:
        # A ZeroMQ socket belongs to one thread: each lane's thread makes its own.
        clients = self._local.__dict__.setdefault("clients", {})
        if lane not in clients:
            clients[lane] = Client(self._endpoints[lane], timeout_s=self._timeout_s)
        return clients[lane]

    def _send(self, client: Client, lane: int, bundle: Bundle) -> None:
        """Stream ``bundle`` to ``lane``'s worker, which installs it on the last part."""
        begin = Message(MessageType.INSTALL, {"model_id": bundle.model_id, "masks": bundle.masks})
        streams.send(client.request, begin, bundle.items)
        with self._lock:
            self._installed[lane].add(bundle.model_id)

    def _send_once(self, lane: int, bundle: Bundle) -> None:
        # A socket of this call's own: it runs on a thread of install's pool, not on a lane's thread.
        with Client(self._endpoints[lane], timeout_s=self._timeout_s) as client:
            self._send(client, lane, bundle)

    def install(self, source: BundleSource) -> None:
        bundle = source()
        # The workers build their kernels at once, each in its own process.
        with ThreadPoolExecutor(self.lanes, thread_name_prefix="install") as pool:
            done = [pool.submit(self._send_once, lane, bundle) for lane in range(self.lanes)]
            failures = [f.exception() for f in done if f.exception() is not None]
        if failures:
            self.uninstall(bundle.model_id)
            raise failures[0]

    def uninstall(self, model_id: str) -> None:
        for lane, endpoint in enumerate(self._endpoints):
            with self._lock:
                self._installed[lane].discard(model_id)
            try:
                with Client(endpoint, timeout_s=self._timeout_s) as client:
                    client.request(Message(MessageType.UNINSTALL, {"model_id": model_id}))
            except HeclaveError as exc:
                log.warning("worker %d did not forget model %s: %s", lane, model_id, exc.message)

    def evaluate(
        self, lane: int, model_id: str, stage: int, inputs: list[bytes], batch: int, source: BundleSource
    ) -> tuple[list[bytes], OpCounter]:
        client = self._lane(lane)
        with self._lock:
            installed = model_id in self._installed[lane]
        if not installed:
            self._send(client, lane, source())
        content = {"model_id": model_id, "stage": stage, "batch": batch}
        reply = client.request(Message(MessageType.EVALUATE, content, inputs))
        return list(reply.buffers), OpCounter(**reply.content["ops"])

    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children]

    def close(self) -> None:
        for child in self._children:
            child.stop()
