"""The enclave's part of a model of mixed placements.

At each hand-over the enclave finishes the stage the server just computed
(decrypting CKKS partial sums, removing a blinded layer's pad, or taking a
``plain`` activation as it is), applies the nonlinear steps, runs any
``enclave`` stages itself, and prepares the input of the next stage in the form
its placement needs: fresh ciphertexts (``he``), ``x + r mod p`` (``blinded``,
the pad kept here), or the plaintext activation (``plain``: the server sees it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from he.blinding import P, activation_scale, centred
from he.graph import ModelGraph, Placement
from he.sparse import SparseMatrix
from protocol.errors import CiphertextError, ErrorCode, HeclaveError, PlanError, ProtocolError

from .nonlinear import apply_ops

MAX_PENDING_PADS = 1024
POOL_SIZE = 8


class Form(str, Enum):
    """How an activation crosses between the server and the enclave."""

    PARTIALS = "partials"  # CKKS partial sums of an ``he`` stage
    CIPHERTEXTS = "ciphertexts"  # fresh ciphertexts for the next ``he`` stage
    BLINDED = "blinded"  # x + r mod p, or the server's W (x + r) mod p
    PLAIN = "plain"  # a plaintext activation: the server sees it
    INPUT = "input"  # the data owner's input, sealed in its session


@dataclass
class ModelRuntime:
    """One registered model: its graph, the weights and biases only the enclave holds, and pending pads."""

    graph: ModelGraph
    weights: dict[int, SparseMatrix]
    biases: dict[int, np.ndarray]
    pads: OrderedDict = field(default_factory=OrderedDict)
    pool: dict[int, list[tuple[np.ndarray, np.ndarray, float]]] = field(default_factory=dict)

    @classmethod
    def from_secrets(cls, graph: ModelGraph, blobs: dict) -> ModelRuntime:
        """Check that the owner sent exactly the weights the enclave needs, in the right shapes."""
        weights, biases = {}, {}
        for i, stage in enumerate(graph.stages):
            blob = blobs.get(str(i))
            g = stage.geometry
            if stage.placement is Placement.HE:
                if not isinstance(blob, bytes) or len(blob) != g.rows * 8:
                    raise PlanError(f"Stage {i} (he) needs its bias of {g.rows} float64 values sealed.")
                biases[i] = np.frombuffer(blob, dtype="<f8")
            elif stage.placement is not Placement.PLAIN:
                if not isinstance(blob, bytes):
                    raise PlanError(f"Stage {i} ({stage.placement.value}) needs its {g.rows}x{g.cols} weights sealed.")
                dtype = "f8" if stage.placement is Placement.ENCLAVE else "i8"
                weights[i] = SparseMatrix.from_bytes(blob, (g.rows, g.cols), dtype)
        return cls(graph, weights, biases)

    def finish(self, index: int, form: Form, values: np.ndarray, batch: int, key: str) -> np.ndarray:
        """Activations ``[B, n]`` after stage ``index``'s nonlinear steps, from what the server sent."""
        stage = self.graph.stages[index]
        if form is Form.BLINDED:
            ys = self._unblind(index, values, batch, key)
        elif form is Form.PLAIN:
            return values  # the server ran this plain stage and its steps itself
        else:
            ys = values + self.biases[index]
        return np.stack([apply_ops(y, stage.ops) for y in ys])

    def advance(self, start: int, xs: np.ndarray) -> tuple[int, np.ndarray]:
        """Run ``enclave`` stages from ``start`` on; returns the next stage to hand over and its input."""
        index = start
        while index < len(self.graph.stages) and self.graph.stages[index].placement is Placement.ENCLAVE:
            ys = self.weights[index].apply(np.concatenate([xs, np.ones((len(xs), 1))], axis=1))
            xs = np.stack([apply_ops(y, self.graph.stages[index].ops) for y in ys])
            index += 1
        return index, xs

    def blind(self, index: int, xs: np.ndarray, key: str) -> tuple[np.ndarray, float]:
        """``x_q + r mod p`` for each query, keeping the pad's ``W r`` and the scale here.

        Also returns the offline milliseconds the pads took (0 for pads made on the spot).
        """
        sums = self.weights[index].abs_row_sums
        augmented = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
        scales = [activation_scale(sums, row) for row in augmented]
        pads = [self._pad(index) for _ in augmented]
        quantized = np.stack([np.mod(np.round(row * 2.0**s).astype(np.int64), P) for row, s in zip(augmented, scales)])
        self.pads[(key, index)] = ([wr for _, wr, _ in pads], scales)
        while len(self.pads) > MAX_PENDING_PADS:
            self.pads.popitem(last=False)
        return np.mod(quantized + np.stack([r for r, _, _ in pads]), P), sum(ms for _, _, ms in pads)

    def _pad(self, index: int) -> tuple[np.ndarray, np.ndarray, float]:
        """A one-time pad, its product with the layer's weights and its offline cost, from the pool if ready."""
        ready = self.pool.get(index)
        if ready:
            return ready.pop()
        return (*self._new_pad(index), 0.0)

    def _new_pad(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng().integers(0, P, size=self.weights[index].shape[1], dtype=np.int64)
        return r, self.weights[index].apply_mod(r)

    def refill(self) -> bool:
        """Precompute one pad for a blinded layer whose pool is short (Slalom's offline phase); False if full."""
        for index in self.weights:
            if self.graph.stages[index].placement is Placement.BLINDED:
                pool = self.pool.setdefault(index, [])
                if len(pool) < POOL_SIZE:
                    started = time.perf_counter()
                    pool.append((*self._new_pad(index), (time.perf_counter() - started) * 1e3))
                    return True
        return False

    def _unblind(self, index: int, values: np.ndarray, batch: int, key: str) -> np.ndarray:
        pending = self.pads.pop((key, index), None)
        if pending is None:
            raise HeclaveError(
                "No pad is pending for this blinded layer; the request cannot continue.", ErrorCode.BAD_FIELD
            )
        products, scales = pending
        rows = self.weights[index].shape[0]
        if values.shape != (batch, rows) or values.min(initial=0) < 0 or values.max(initial=0) >= P:
            raise CiphertextError("The blinded layer's output does not have the layer's shape or is outside the field.")
        bits = self.graph.stages[index].weight_bits
        return np.stack([centred(np.mod(v - wr, P)) / 2.0 ** (s + bits) for v, wr, s in zip(values, products, scales)])


def parse_values(buffers: tuple[bytes, ...] | list[bytes], dtype: str, shape: tuple[int, int], what: str) -> np.ndarray:
    """One buffer holding a ``shape`` array of ``dtype``, or a :class:`ProtocolError` naming ``what``."""
    if len(buffers) != 1 or len(buffers[0]) != shape[0] * shape[1] * 8:
        raise ProtocolError(
            f"The {what} must be one buffer of {shape[0]}x{shape[1]} 8-byte values.", ErrorCode.BAD_FIELD
        )
    return np.frombuffer(buffers[0], dtype=dtype).reshape(shape)
