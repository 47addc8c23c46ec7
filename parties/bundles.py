"""Deployed model bundles on the server's disk: versioned, written atomically, reloaded at start.

A bundle holds only what the server already holds in memory: the public graph,
the model's own public context (public key, relinearization keys and the Galois
keys the enclave issued for it), and the weights in the form the model owner
chose (ciphertexts under that context unless the deployment is ``--weights plain``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import msgpack

from heclave.protocol.errors import ErrorCode, HeclaveError
from heclave.protocol.storage import write_atomic

log = logging.getLogger(__name__)

# 2: each model's own public context, not Galois keys beside one shared context.
BUNDLE_FORMAT = 2
SUFFIX = ".bundle"


@dataclass(frozen=True)
class Bundle:
    """Everything needed to serve one deployed model again after a restart."""

    model_id: str
    graph: bytes
    context: bytes
    masks: list[bytes]
    weights: list[bytes]

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "format": BUNDLE_FORMAT,
                "model_id": self.model_id,
                "graph": self.graph,
                "context": self.context,
                "masks": self.masks,
                "weights": self.weights,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes, origin: Path) -> Bundle:
        try:
            d = msgpack.unpackb(data, raw=False)
            fmt = d.get("format")
        except Exception:
            raise HeclaveError(f"{origin} is not a heclave model bundle.", ErrorCode.INTERNAL) from None
        if fmt != BUNDLE_FORMAT:
            raise HeclaveError(
                f"{origin} is a bundle of format {fmt!r}; this server reads format {BUNDLE_FORMAT}. "
                "Redeploy the model with this version.",
                ErrorCode.INTERNAL,
            )
        return cls(d["model_id"], d["graph"], d["context"], d["masks"], d["weights"])


class BundleStore:
    """One file per deployed model under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, bundle: Bundle) -> None:
        write_atomic(self.directory / f"{bundle.model_id}{SUFFIX}", bundle.to_bytes())

    def delete(self, model_id: str) -> None:
        """Forget an undeployed model's bundle."""
        (self.directory / f"{model_id}{SUFFIX}").unlink(missing_ok=True)

    def load_all(self) -> list[Bundle]:
        bundles = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                bundles.append(Bundle.from_bytes(path.read_bytes(), path))
            except (HeclaveError, KeyError, TypeError) as exc:
                log.error("skipping %s: %s", path.name, getattr(exc, "message", type(exc).__name__))
        return bundles
