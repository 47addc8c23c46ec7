"""The enclave's part of one model: its own CKKS key set, its secret weights, and its stages' checks.

At each hand-over the enclave accepts only what the request's next stage
produces (``accept``): CKKS partial sums at exactly the level, scale,
polynomial count and ciphertext count of that stage; a blinded layer's field
vector; a ``plain`` activation. It verifies a server-computed result against
the activation it handed out (``tee.verify``) before anything is derived from
it, then finishes the stage (bias, pad removal, nonlinear steps), runs any
``enclave`` stages itself, and prepares the next stage's input in the form its
placement needs (``handout``): fresh ciphertexts under this model's key, ``x +
r mod p`` with the pad kept here, or the plaintext activation (``plain``: the
server sees it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from heclave.arith.blinding import P, activation_scale, centred
from heclave.arith.nonlinear import apply_ops
from heclave.arith.sparse import SparseMatrix
from heclave.arith.values import parse_values
from heclave.graph.model import ModelGraph
from heclave.graph.placement import Form, Placement, WeightForm
from heclave.he.context import SecretKeySet
from heclave.he.linear import unpack_mask
from heclave.he.sampling import uniform_residues
from heclave.protocol.errors import CiphertextError, ErrorCode, IntegrityError, PlanError, ProtocolError

from .precompute import MaskPool, NoisePool
from .release import flood
from .requests import Request
from .verify import FieldCheck, LinearCheck

log = logging.getLogger(__name__)

POOL_SIZE = 8


_ACCEPTS = {Placement.HE: Form.PARTIALS, Placement.BLINDED: Form.BLINDED, Placement.PLAIN: Form.PLAIN}


@dataclass
class ModelRuntime:
    """One registered model as the enclave holds it.

    ``weights`` holds every matrix the enclave needs: an ``enclave`` stage's
    ``[W | b]``, a ``blinded`` stage's field weights and an ``he`` stage's ``W``
    (for its check only); ``biases`` the ``he`` stages' biases; ``polynomials``
    how many polynomials each output ciphertext of an ``he`` stage has.
    """

    graph: ModelGraph
    keys: SecretKeySet
    weights: dict[int, SparseMatrix]
    biases: dict[int, np.ndarray]
    polynomials: dict[int, list[int]]
    checks: dict[int, LinearCheck | FieldCheck] = field(default_factory=dict)
    pool: dict[int, list[tuple[np.ndarray, np.ndarray, float]]] = field(default_factory=dict)
    masks: MaskPool = field(init=False)
    noise: NoisePool = field(init=False)
    failures: int = 0
    verify: bool = True

    def __post_init__(self) -> None:
        self.masks = MaskPool(self.keys)
        self.noise = NoisePool()
        encrypted = self.graph.weight_form is WeightForm.ENCRYPTED
        for i, stage in enumerate(self.graph.stages):
            if stage.placement is Placement.HE:
                self.checks[i] = LinearCheck(self.weights[i], stage.layout, encrypted, self.keys.params)
            elif stage.placement is Placement.BLINDED:
                self.checks[i] = FieldCheck(self.weights[i])

    @classmethod
    def from_secrets(cls, graph: ModelGraph, keys: SecretKeySet, vouched: dict, verify: bool = True) -> ModelRuntime:
        """The runtime from what the model owner sealed, refusing anything missing or misshapen.

        ``verify=False`` is the enclave's ``insecure_skip_verification``: results are used unchecked.
        """
        blobs, bias_blobs, masks = (vouched.get(k) for k in ("weights", "biases", "masks"))
        if not isinstance(blobs, dict) or not isinstance(bias_blobs, dict) or not isinstance(masks, list):
            raise PlanError("The sealed registration must carry weights, biases and diagonal masks.")
        if len(masks) != len(graph.stages) or not all(isinstance(m, bytes) for m in masks):
            raise PlanError("The sealed registration carries one diagonal mask per stage.")
        weights, biases, polynomials = {}, {}, {}
        for i, stage in enumerate(graph.stages):
            g, blob = stage.layout, blobs.get(str(i))
            if stage.placement is Placement.PLAIN:
                continue
            if not isinstance(blob, bytes):
                raise PlanError(f"Stage {i} ({stage.placement.value}) needs its {g.rows}x{g.cols} weights sealed.")
            dtype = "i8" if stage.placement is Placement.BLINDED else "f8"
            weights[i] = SparseMatrix.from_bytes(blob, (g.rows, g.cols), dtype)
            if stage.placement is Placement.HE:
                bias = bias_blobs.get(str(i))
                if not isinstance(bias, bytes) or len(bias) != g.rows * 8:
                    raise PlanError(f"Stage {i} (he) needs its bias of {g.rows} float64 values sealed.")
                biases[i] = np.frombuffer(bias, dtype="<f8")
                polynomials[i] = _polynomials(graph, i, masks[i])
        return cls(graph, keys, weights, biases, polynomials, verify=verify)

    def accept(self, request: Request, form: Form, buffers: list[bytes] | tuple[bytes, ...]) -> int:
        """The request's expected stage, finished from what the server sent: checked, verified, its steps applied.

        Returns the last stage the result covers (a run of ``plain`` stages is
        one hand-over), whose result is now among the request's values. Raises :class:`IntegrityError`
        (after drawing fresh check vectors) if the server's result is not the
        layer applied to the activation handed out.
        """
        index = request.expected
        stage = self.graph.stages[index]
        if _ACCEPTS.get(stage.placement) is not form:
            raise ProtocolError(
                f"Stage {index} is placed {stage.placement.value!r}; {form.value!r} does not fit it.",
                ErrorCode.BAD_FIELD,
            )
        batch, g = request.batch, stage.layout
        if form is Form.PLAIN:
            last = self.graph.plain_run_end(index)
            shape = (batch, _size(self.graph.stages[last].result_shape))
            self._keep(request, last, parse_values(buffers, "<f8", shape, "plain activation"))
            return last
        if form is Form.BLINDED:
            values = parse_values(buffers, "<i8", (batch, g.rows), "blinded layer output")
            if values.min(initial=0) < 0 or values.max(initial=0) >= P:
                raise CiphertextError("The blinded layer's output is outside the field.")
            self._verify(index, request, values)
            ys = self._unblind(index, values, request.pending)
        else:
            ys = g.scatter_batch(self._decrypt(index, buffers, batch), batch)
            self._verify(index, request, ys)
            ys = ys + self.biases[index]
        self._finish(request, index, ys)
        return index

    def _finish(self, request: Request, index: int, ys: np.ndarray) -> None:
        """Stage ``index``'s steps on its affine output ``ys``, with the earlier values they combine."""
        stage, values = self.graph.stages[index], request.values
        rows = [{v: values[v][b] for v in stage.operands} for b in range(len(ys))]
        self._keep(request, index, np.stack([apply_ops(y, stage.ops, row) for y, row in zip(ys, rows)]))

    def _keep(self, request: Request, index: int, result: np.ndarray) -> None:
        """Record stage ``index``'s result as value ``index + 1``, and forget the values no stage after it reads."""
        request.values[index + 1] = result
        last, final = self.graph.last_reads, len(self.graph.stages)
        for value in [v for v in request.values if v != final and last.get(v, -1) <= index]:
            del request.values[value]

    def _decrypt(self, index: int, buffers: list[bytes] | tuple[bytes, ...], batch: int) -> np.ndarray:
        """A stage's partial sums, after refusing any ciphertext the honest stage would not have produced."""
        g = self.graph.stages[index].layout
        expected = self.polynomials[index] * g.groups(batch)
        if len(buffers) != len(expected):
            raise CiphertextError(f"Stage {index} produces {len(expected)} ciphertexts, {len(buffers)} arrived.")
        return np.stack(
            [
                self.keys.decrypt_output(data, f"output {o} of stage {index}", polynomials=size)
                for o, (data, size) in enumerate(zip(buffers, expected))
            ]
        )

    def prepare(self, request: Request) -> bool:
        """Make what the check of the request's handed-out stage needs of its inputs, while the server computes
        that stage; False if there is nothing to make."""
        check = self.checks.get(request.expected)
        if not self.verify or check is None or request.inputs is None or request.expectation is not None:
            return False
        started = time.perf_counter()
        request.expectation = check.expect(request.inputs)
        request.offline_ms += (time.perf_counter() - started) * 1e3
        return True

    def _verify(self, index: int, request: Request, outputs: np.ndarray) -> None:
        if not self.verify:
            return
        check = self.checks[index]
        bound = check.check(request.expectation or check.expect(request.inputs), outputs)
        if bound is not None:
            request.bound = max(request.bound, bound)
            return
        self.checks[index].redraw()
        self.failures += 1
        log.warning("security event: stage %d failed its integrity check (%d so far)", index, self.failures)
        raise IntegrityError(
            "The server's result for a layer is not that layer applied to this request's input; the request "
            "was ended and nothing was released. Send it again; if this repeats, the server is misbehaving."
        )

    def advance(self, request: Request, start: int) -> tuple[int, np.ndarray]:
        """Run ``enclave`` stages from ``start`` on; returns the next stage to hand over and its input, or the
        number of stages and the model's output."""
        stages, index = self.graph.stages, start
        while index < len(stages) and stages[index].placement is Placement.ENCLAVE:
            xs = request.values[stages[index].source]
            self._finish(request, index, self.weights[index].apply(np.concatenate([xs, np.ones((len(xs), 1))], axis=1)))
            index += 1
        return index, request.values[stages[index].source if index < len(stages) else index]

    def handout(self, request: Request, index: int, xs: np.ndarray) -> tuple[Form, list[bytes], float]:
        """Stage ``index``'s input for the server, recorded in ``request`` for the check; with offline ms spent.

        The first ``he`` stage's ciphertexts come from the data owner, so none are made here.
        """
        request.expected, request.pending, request.expectation = index, None, None
        stage = self.graph.stages[index]
        if stage.placement is Placement.HE:
            request.inputs = xs
            if index == 0:
                return Form.CIPHERTEXTS, [], 0.0
            encrypted = [self.masks.encrypt(row) for row in stage.layout.gather_batch(xs)]
            return Form.CIPHERTEXTS, [data for data, _ in encrypted], sum(ms for _, ms in encrypted)
        if stage.placement is Placement.BLINDED:
            blinded, products, scales, offline_ms = self._blind(index, xs)
            request.inputs, request.pending = blinded, (products, scales)
            return Form.BLINDED, [blinded.astype("<i8").tobytes()], offline_ms
        request.inputs = None
        # The server sees this activation: it gets the release's flooding, or an exact decryption of a
        # layer output it may have forged under the check's tolerance would show it the key.
        flooded, offline_ms = self.flood(xs, request.bound)
        return Form.PLAIN, [np.ascontiguousarray(flooded, dtype="<f8").tobytes()], offline_ms

    def flood(self, xs: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
        """``xs`` with the release's noise for checks that tolerated ``bound`` (``tee.release``), and the
        offline milliseconds its draws took; unchanged when nothing the server computed was tolerated."""
        if bound <= 0.0:
            return xs, 0.0
        normals, offline_ms = self.noise.take(xs.size)
        return flood(xs, bound, normals), offline_ms

    def _blind(self, index: int, xs: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[int], float]:
        """``x_q + r mod p`` for each query, the pads' ``W r``, the scales, and the offline ms the pads took."""
        sums = self.weights[index].abs_row_sums
        augmented = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
        scales = [activation_scale(sums, row) for row in augmented]
        pads = [self._pad(index) for _ in augmented]
        quantized = np.stack([np.mod(np.round(row * 2.0**s).astype(np.int64), P) for row, s in zip(augmented, scales)])
        blinded = np.mod(quantized + np.stack([r for r, _, _ in pads]), P)
        return blinded, [wr for _, wr, _ in pads], scales, sum(ms for _, _, ms in pads)

    def _pad(self, index: int) -> tuple[np.ndarray, np.ndarray, float]:
        """A one-time pad, its product with the layer's weights and its offline cost, from the pool if ready."""
        ready = self.pool.get(index)
        if ready:
            return ready.pop()
        return (*self._new_pad(index), 0.0)

    def _new_pad(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        r = uniform_residues(P, self.weights[index].shape[1]).astype(np.int64)  # a one-time pad: CSPRNG only
        return r, self.weights[index].apply_mod(r)

    def refill(self) -> bool:
        """Precompute one pad for a blinded layer, one key mask or a chunk of flooding noise; False when every
        pool is full."""
        for index, stage in enumerate(self.graph.stages):
            if stage.placement is Placement.BLINDED:
                pool = self.pool.setdefault(index, [])
                if len(pool) < POOL_SIZE:
                    started = time.perf_counter()
                    pool.append((*self._new_pad(index), (time.perf_counter() - started) * 1e3))
                    return True
        return (self.graph.reencrypts and self.masks.refill()) or (self.verify and self.noise.refill())

    def _unblind(self, index: int, values: np.ndarray, pending: tuple) -> np.ndarray:
        products, scales = pending
        bits = self.graph.stages[index].weight_bits
        return np.stack([centred(np.mod(v - wr, P)) / 2.0 ** (s + bits) for v, wr, s in zip(values, products, scales)])


def _polynomials(graph: ModelGraph, index: int, packed: bytes) -> list[int]:
    """Polynomials in each output ciphertext of ``he`` stage ``index`` (see ``he.linear``).

    Plaintext weights leave two. With encrypted weights, the products of the
    unrotated giant-step group stay unrelinearized (three), so an output
    ciphertext has three exactly when that group has a diagonal.
    """
    g = graph.stages[index].layout
    if graph.weight_form is WeightForm.PLAIN:
        return [2] * g.out_cts
    mask = unpack_mask(packed, g, f"Stage {index}")
    return [3 if mask[o, :, : g.baby].any() else 2 for o in range(g.out_cts)]


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))
