"""Deployed model bundles on the server's disk: versioned, written atomically, reloaded at start.

A bundle holds only what the server already holds in memory: the public graph,
the model's own public context (public key, relinearization keys and the Galois
keys the enclave issued for it), and the weights in the form the model owner
chose (ciphertexts under that context unless the deployment is ``--weights plain``).

On disk it is a small msgpack header (format, model id, diagonal masks, and the
size of every item) followed by the items' raw bytes: the graph, the context,
then each weight item. It is written and read item by item, so a model of
hundreds of MB costs no second copy of itself in memory; the same items are what
the server streams to its workers (``parties.executors``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack

from heclave.protocol.errors import ErrorCode, HeclaveError
from heclave.protocol.storage import write_atomic

log = logging.getLogger(__name__)

# 3: a header, then the items' raw bytes (2: one msgpack map; 2 added each model's own public context).
BUNDLE_FORMAT = 3
SUFFIX = ".bundle"
_HEADER_LIMIT = 64 << 20
MAX_WEIGHT_BYTES = 4 << 30
"""The most a model's server-side weights may declare (``deploy``): refused before anything is kept."""
MAX_BUNDLE_BYTES = MAX_WEIGHT_BYTES + (128 << 20)
"""A bundle as a worker accepts it: the weights, the graph and the public context."""


@dataclass(frozen=True)
class Bundle:
    """Everything needed to serve one deployed model again after a restart."""

    model_id: str
    graph: bytes
    context: bytes
    masks: list[bytes]
    weights: list[bytes]

    @property
    def items(self) -> list[bytes]:
        """What follows the header, in order: the graph, the public context, the weight items."""
        return [self.graph, self.context, *self.weights]

    @classmethod
    def of_items(cls, model_id: str, masks: list[bytes], items: list[bytes]) -> Bundle:
        """The bundle whose :attr:`items` are ``items`` (a worker's install, a file's body)."""
        if len(items) < 2:
            raise HeclaveError("A bundle carries at least its graph and its public context.", ErrorCode.BAD_FIELD)
        return cls(model_id, items[0], items[1], masks, items[2:])

    def pieces(self) -> Iterator[bytes]:
        """The bundle's bytes as written: the header, then each item."""
        header = {
            "format": BUNDLE_FORMAT,
            "model_id": self.model_id,
            "masks": self.masks,
            "sizes": [len(item) for item in self.items],
        }
        yield msgpack.packb(header, use_bin_type=True)
        yield from self.items

    def to_bytes(self) -> bytes:
        return b"".join(self.pieces())

    @classmethod
    def from_bytes(cls, data: bytes, origin: Path) -> Bundle:
        return cls._parse(io.BytesIO(data), origin)

    @classmethod
    def read(cls, path: Path) -> Bundle:
        """Read a bundle file item by item."""
        with open(path, "rb") as f:
            return cls._parse(f, path)

    @classmethod
    def _parse(cls, f: BinaryIO, origin: Path) -> Bundle:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=_HEADER_LIMIT)
        try:
            header = unpacker.unpack()
            fmt = header.get("format")
        except Exception:  # another format's single map is past the header limit; or not msgpack at all
            raise HeclaveError(
                f"{origin} is not a heclave model bundle of format {BUNDLE_FORMAT} (an older format, or damaged). "
                "Redeploy the model with this version.",
                ErrorCode.INTERNAL,
            ) from None
        if fmt != BUNDLE_FORMAT:
            raise HeclaveError(
                f"{origin} is a bundle of format {fmt!r}; this server reads format {BUNDLE_FORMAT}. "
                "Redeploy the model with this version.",
                ErrorCode.INTERNAL,
            )
        model_id, masks, sizes = header.get("model_id"), header.get("masks"), header.get("sizes")
        well_formed = (
            isinstance(model_id, str)
            and isinstance(masks, list)
            and all(isinstance(m, bytes) for m in masks)
            and isinstance(sizes, list)
            and all(isinstance(s, int) and s >= 0 for s in sizes)
        )
        if not well_formed:
            raise HeclaveError(f"{origin} has a damaged header; redeploy the model.", ErrorCode.INTERNAL)
        f.seek(unpacker.tell())
        items = [f.read(size) for size in sizes]
        if any(len(item) != size for item, size in zip(items, sizes)) or f.read(1):
            raise HeclaveError(f"{origin} is truncated or padded; redeploy the model.", ErrorCode.INTERNAL)
        return cls.of_items(model_id, masks, items)


class BundleStore:
    """One file per deployed model under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, bundle: Bundle) -> None:
        write_atomic(self.directory / f"{bundle.model_id}{SUFFIX}", bundle.pieces())

    def delete(self, model_id: str) -> None:
        """Forget an undeployed model's bundle."""
        (self.directory / f"{model_id}{SUFFIX}").unlink(missing_ok=True)

    def load_all(self) -> list[Bundle]:
        bundles = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                bundles.append(Bundle.read(path))
            except HeclaveError as exc:
                log.error("skipping %s: %s", path.name, exc.message)
        return bundles
