"""The server's HE work on a Ray cluster: one actor per lane, models shipped once through the object store.

Actors receive only public material. A model's bundle (public graph, the
model's public context, weights in the owner's form) is put into Ray's object store once and each
actor installs it from there the first time its lane needs it; ciphertexts
travel as bytes with each task. The enclave stays one process on the server's
host: only the server talks to it.

Ray serialises task arguments and results with pickle between the server's own
processes. What travels is byte strings the server itself built (ciphertexts,
bundles): nothing a party sent is ever unpickled, since a party's message is
parsed by the server's msgpack decoder before any of its bytes reach Ray.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from heclave.he.linear import OpCounter
from heclave.protocol.errors import HeclaveError

from .bundles import Bundle
from .executors import BundleSource, Executor
from .worker import HeWorker

log = logging.getLogger(__name__)

INSTALL_RAY = "pip install 'heclave[ray]'"


def ray_missing() -> str | None:
    """Why the HE work cannot run on Ray here, as a sentence saying how to fix it, or ``None`` when it can.

    Ray is an optional extra: without it only the other executors are available. The check imports Ray
    (finding the package is not enough, an install can be broken), so it costs Ray's import time once.
    """
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return f"Ray is not installed here ({exc}); install it with `{INSTALL_RAY}`."
    return None


class _Actor:
    """The body of a Ray actor: a :class:`HeWorker`."""

    def __init__(self) -> None:
        self.worker = HeWorker()

    def install(self, bundle: bytes) -> None:
        self.worker.install(Bundle.from_bytes(bundle, Path("<ray object store>")))

    def uninstall(self, model_id: str) -> None:
        self.worker.uninstall(model_id)

    def evaluate(self, model_id: str, stage: int, inputs: list[bytes], batch: int) -> tuple[list[bytes], dict]:
        outputs, ops = self.worker.evaluate(model_id, stage, inputs, batch)
        return outputs, ops.__dict__


class RayExecutor(Executor):
    """``lanes`` actors on the Ray cluster at ``address`` (``local`` starts one on this machine)."""

    def __init__(self, lanes: int, address: str) -> None:
        import ray

        self._ray = ray
        if not ray.is_initialized():
            options = {"num_cpus": lanes} if address == "local" else {"address": address}
            ray.init(**options, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        actor = ray.remote(num_cpus=1)(_Actor)
        self.lanes = lanes
        self._actors = [actor.remote() for _ in range(lanes)]
        self._bundles: dict[str, object] = {}
        self._installed: list[set[str]] = [set() for _ in range(lanes)]
        self._lock = threading.Lock()

    def _bundle_ref(self, model_id: str, source: BundleSource) -> object:
        with self._lock:
            if model_id not in self._bundles:
                self._bundles[model_id] = self._ray.put(source().to_bytes())
            return self._bundles[model_id]

    def install(self, source: BundleSource) -> None:
        bundle = source()
        ref = self._bundle_ref(bundle.model_id, lambda: bundle)
        try:
            self._ray.get([actor.install.remote(ref) for actor in self._actors])
        except Exception as exc:  # Ray wraps an actor's refusal (a HeclaveError) in a type of its own
            self.uninstall(bundle.model_id)
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, HeclaveError) else exc) from None
        with self._lock:
            for installed in self._installed:
                installed.add(bundle.model_id)

    def uninstall(self, model_id: str) -> None:
        with self._lock:
            self._bundles.pop(model_id, None)
            for installed in self._installed:
                installed.discard(model_id)
        try:
            self._ray.get([actor.uninstall.remote(model_id) for actor in self._actors])
        except Exception as exc:  # Ray wraps an actor's failure in its own types
            log.warning("a Ray actor did not forget model %s: %s", model_id, type(exc).__name__)

    def evaluate(
        self, lane: int, model_id: str, stage: int, inputs: list[bytes], batch: int, source: BundleSource
    ) -> tuple[list[bytes], OpCounter]:
        actor = self._actors[lane]
        if model_id not in self._installed[lane]:
            self._ray.get(actor.install.remote(self._bundle_ref(model_id, source)))
            self._installed[lane].add(model_id)
        outputs, ops = self._ray.get(actor.evaluate.remote(model_id, stage, inputs, batch))
        return outputs, OpCounter(**ops)

    def close(self) -> None:
        self._ray.shutdown()
