"""Verification of the layers the server computes for the enclave (Freivalds' check, as Slalom does).

The enclave hands the server an activation ``x`` (encrypted for ``he`` stages,
one-time padded for ``blinded`` ones) and gets back what should be ``y = W x``.
Before it decrypts-and-uses, re-encrypts or releases anything derived from
``y``, it checks ``R y = (R W) x`` with ``k`` secret random vectors ``R``
drawn inside the enclave; ``R W`` is computed once per draw from the weights the
model owner sealed to the enclave, so a check costs ``k (rows + cols)``
multiplications per query instead of the layer's ``rows x cols``.

**Over the field** (``blinded``) the check is exact: ``R`` is uniform in
``Z_p``, and a wrong ``y`` passes one vector with probability ``1/p`` (the
difference is a nonzero vector and ``r . d`` is uniform), all of them with
``p^-k``.

**Over the reals** (``he``) the honest ``y`` carries CKKS noise, so the check
has a tolerance. With Rademacher vectors (entries ``+-1``) an error ``e`` with
``max |e_j| > tau`` passes one vector with probability at most 1/2: flipping the
sign of ``r`` at that coordinate moves ``r . e`` by more than ``2 tau``, so at
most one of the pair lands in ``[-tau, tau]``. ``k`` independent vectors let it
pass with probability at most ``2^-k``. The tolerance ``tau`` comes from the
noise of the honest computation (:func:`slot_noise_sd`, :meth:`LinearCheck.tolerance`)
with a margin of ``Z`` standard deviations; its derivation is in those docstrings.

The vectors come from the enclave's CSPRNG (``he.sampling``). After any
failure they are drawn afresh, so what a failed probe taught the server about
``R`` is worthless for the next one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from heclave.arith.blinding import P
from heclave.arith.sparse import SparseMatrix
from heclave.graph.layouts.base import Layout
from heclave.graph.params import CkksParams
from heclave.he.sampling import NOISE_VARIANCE, random_words, uniform_residues

VECTORS = 40
FIELD_VECTORS = 2
Z = 10.0


def slot_noise_sd(params: CkksParams) -> float:
    """The standard deviation of one slot's noise in a fresh ciphertext, in units of the message.

    A public-key encryption carries ``e0 + u e1 + e2 s`` (symmetric ones only
    ``e``): ``u`` and ``s`` are uniform ternary (variance 2/3 per coefficient),
    the ``e`` have variance ``sigma^2`` (``he.sampling``). A coefficient of
    ``u e1`` sums ``N`` products, variance ``(2/3) N sigma^2``; a slot sums ``N``
    coefficients times roots of unity, so its variance is ``N`` times the
    coefficients'. Altogether about ``(1 + 4N/3) N sigma^2``, divided by the
    scale ``Delta^2``. Key switching with SEAL's special prime adds a term of
    the same order to a rotated ciphertext.
    """
    n = params.poly_modulus_degree
    return math.sqrt((1 + 4 * n / 3) * n * NOISE_VARIANCE) / params.scale


def rescale_noise_variance(params: CkksParams, polynomials: int) -> float:
    """The variance one slot gains when a ciphertext of 2 or 3 polynomials is rescaled, in message units.

    Rescaling rounds each polynomial, adding ``r1 s`` (and ``r2 s^2``) with
    ``r`` uniform in ``[-1/2, 1/2]`` (variance 1/12): a coefficient of ``r1 s``
    has variance ``N (1/12)(2/3)``, one of ``r2 s^2`` about ``N (1/12) (4N/9)``
    (a coefficient of ``s^2`` has variance ``(4/9) N``); a slot again ``N`` times
    that. The output scale ``Delta^2 / q`` is within a factor of 2 of ``Delta``.
    """
    n = params.poly_modulus_degree
    variance = n * n / 18 + (n**3 / 27 if polynomials == 3 else 0.0)
    return variance / params.scale**2


@dataclass
class Expectation:
    """What a check needs of the inputs it handed out, made before the server's result arrives.

    ``rhs`` is ``(R W) u`` for each query (``[B, vectors]``) and ``tolerances``
    each query's tolerance (zero in the field); ``generation`` names the vectors
    they were made with, so that a redraw in between is noticed.
    """

    inputs: np.ndarray = field(repr=False)
    generation: int
    rhs: np.ndarray = field(repr=False)
    tolerances: np.ndarray


class _Check(ABC):
    """What both checks share: drawing the secret vectors ``R``, and comparing ``R v`` with ``(R W) u``."""

    _generation = 0

    @abstractmethod
    def _draw(self) -> None: ...

    @abstractmethod
    def _rhs(self, inputs: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _lhs(self, outputs: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _tolerances(self, inputs: np.ndarray) -> np.ndarray: ...

    def redraw(self) -> None:
        """Fresh secret vectors (after a failure, so that what a probe taught the server is worthless)."""
        self._generation += 1
        self._draw()

    def expect(self, inputs: np.ndarray) -> Expectation:
        """Everything of the check that depends on the inputs alone; the enclave makes it while the server works."""
        return Expectation(inputs, self._generation, self._rhs(inputs), self._tolerances(inputs))

    def check(self, expected: Expectation, outputs: np.ndarray) -> float | None:
        """``None`` unless every query's output is ``W u`` within its tolerance under every secret vector;
        otherwise the largest tolerance, which is what a passing forgery can hide in an output."""
        if expected.generation != self._generation:
            expected = self.expect(expected.inputs)
        if np.all(np.abs(self._lhs(outputs) - expected.rhs) <= expected.tolerances[:, None]):
            return float(expected.tolerances.max())
        return None

    def residues(self, inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """``R v - (R W) u`` for each query: ``[B, vectors]`` (zero for an exact result)."""
        return self._lhs(outputs) - self._rhs(inputs)

    def tolerances(self, inputs: np.ndarray) -> np.ndarray:
        """Each query's tolerance: the largest residue an honest result can have."""
        return self._tolerances(inputs)


class LinearCheck(_Check):
    """Freivalds' check of one ``he`` stage, ``y = W x`` over the reals, with a derived tolerance."""

    def __init__(
        self, weights: SparseMatrix, layout: Layout, encrypted: bool, params: CkksParams, vectors: int = VECTORS
    ) -> None:
        self._weights = weights
        self._vectors = vectors
        summed = layout.output_row[layout.output_row >= 0]
        # Output slots one query's rows are summed from: each brings its own rescale and key-switching noise.
        slots = len(summed) / max(1, layout.queries)
        sd = slot_noise_sd(params)
        rotated = sd**2 if layout.giant > 1 and layout.k > layout.baby else 0.0
        slot_variance = slots * (rotated + rescale_noise_variance(params, 3 if encrypted else 2))
        self._fixed_variance = sd**2 * float(np.sum(weights.values.astype(np.float64) ** 2)) + slot_variance
        self._input_variance = sd**2 * weights.shape[0] if encrypted else 0.0
        self._draw()

    def _draw(self) -> None:
        bits = random_words(self._vectors * self._weights.shape[0]) & np.uint64(1)
        r = bits.astype(np.float64).reshape(self._vectors, -1) * 2 - 1
        self._r_t = np.ascontiguousarray(r.T)
        self._rw_t = np.ascontiguousarray(_left_product(r, self._weights).T)

    def _tolerances(self, xs: np.ndarray) -> np.ndarray:
        """For each query ``x``, the largest ``|r . (y - W x)|`` an honest evaluation can reach, for a
        Rademacher ``r``.

        The noise terms are independent with standard deviation ``sd`` per slot
        (:func:`slot_noise_sd`): ``W_ji e_i`` for the input's noise and
        ``x_i e'_ji`` for an encrypted weight's (at most ``rows ||x||^2`` in all),
        then per output slot a rescale (:func:`rescale_noise_variance`) and, if
        the layout rotates partial sums, a key switch. A Rademacher ``r`` keeps
        variances as they are, so ``r . e`` has variance ``sd^2 (||W||_F^2 +
        [encrypted] rows ||x||^2) + slots (rescale + key switch)``, doubled
        because a complex slot's lane can take noise from the other lane's
        weights (paired rows). The tolerance is ``Z`` of these standard
        deviations: an honest output fails with probability about ``10^-23``
        per vector.
        """
        variance = self._fixed_variance + self._input_variance * np.einsum("ij,ij->i", xs, xs)
        return Z * np.sqrt(2 * variance)

    def _rhs(self, xs: np.ndarray) -> np.ndarray:
        return xs @ self._rw_t

    def _lhs(self, ys: np.ndarray) -> np.ndarray:
        return ys @ self._r_t


class FieldCheck(_Check):
    """Freivalds' check of one ``blinded`` stage, ``v = W_q u mod p``: exact, so its tolerance is zero."""

    def __init__(self, weights: SparseMatrix, vectors: int = FIELD_VECTORS) -> None:
        self._weights = weights
        self._vectors = vectors
        self._draw()

    def _draw(self) -> None:
        r = uniform_residues(P, self._vectors * self._weights.shape[0]).astype(np.int64).reshape(self._vectors, -1)
        self._r = SparseMatrix.from_dense(r)
        self._rw = SparseMatrix.from_dense(_left_product_mod(r, self._weights))

    def _tolerances(self, inputs: np.ndarray) -> np.ndarray:
        return np.zeros(len(inputs))

    def _rhs(self, inputs: np.ndarray) -> np.ndarray:
        return np.stack([self._rw.apply_mod(u) for u in inputs]).astype(np.float64)

    def _lhs(self, outputs: np.ndarray) -> np.ndarray:
        return np.stack([self._r.apply_mod(v) for v in outputs]).astype(np.float64)


def _left_product(r: np.ndarray, weights: SparseMatrix) -> np.ndarray:
    """``R W`` for dense ``R`` (``[k, rows]``) and sparse ``W``."""
    out = np.zeros((len(r), weights.shape[1]))
    for i, row in enumerate(r):
        out[i] = np.bincount(weights.cols, weights=weights.values * row[weights.rows], minlength=weights.shape[1])
    return out


def _left_product_mod(r: np.ndarray, weights: SparseMatrix) -> np.ndarray:
    """``R W mod p`` exactly, through the transpose's field product."""
    transposed = SparseMatrix((weights.shape[1], weights.shape[0]), weights.cols, weights.rows, weights.values)
    return np.stack([transposed.apply_mod(row) for row in r])
