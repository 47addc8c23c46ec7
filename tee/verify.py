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

import numpy as np

from he.blinding import P
from he.context import CkksParams
from he.layout import Layout
from he.sampling import NOISE_VARIANCE, random_words, uniform_residues
from he.sparse import SparseMatrix

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


class LinearCheck:
    """Freivalds' check of one ``he`` stage, ``y = W x`` over the reals, with a derived tolerance."""

    def __init__(
        self, weights: SparseMatrix, layout: Layout, encrypted: bool, params: CkksParams, vectors: int = VECTORS
    ) -> None:
        self._weights = weights
        self._vectors = vectors
        rows = weights.shape[0]
        norm_w = float(np.sum(weights.values.astype(np.float64) ** 2))
        summed = layout.output_row[layout.output_row >= 0]
        # Output slots one query's rows are summed from: each brings its own rescale and key-switching noise.
        slots = len(summed) / max(1, layout.queries)
        self._sd = slot_noise_sd(params)
        rotated = self._sd**2 if layout.giant > 1 and layout.k > layout.baby else 0.0
        self._slot_variance = slots * (rotated + rescale_noise_variance(params, 3 if encrypted else 2))
        self._encrypted = encrypted
        self._norm_w, self._rows = norm_w, rows
        self.redraw()

    def redraw(self) -> None:
        """Fresh secret vectors; kept as ``[R | -R W]`` so that a check is one product with ``[y | x]``."""
        bits = random_words(self._vectors * self._weights.shape[0]) & np.uint64(1)
        r = bits.astype(np.float64).reshape(self._vectors, -1) * 2 - 1
        self._stacked = np.ascontiguousarray(np.concatenate([r, -_left_product(r, self._weights)], axis=1).T)

    def tolerances(self, xs: np.ndarray) -> np.ndarray:
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
        variance = np.full(len(xs), self._sd**2 * self._norm_w + self._slot_variance)
        if self._encrypted:
            variance += self._sd**2 * self._rows * np.einsum("ij,ij->i", xs, xs)
        return Z * np.sqrt(2 * variance)

    def residues(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """``R (y - W x)`` for each query: ``[B, vectors]``."""
        return np.concatenate([ys, xs], axis=1) @ self._stacked

    def check(self, xs: np.ndarray, ys: np.ndarray) -> float | None:
        """``None`` unless every query's ``y`` is ``W x`` within its tolerance under every secret vector;
        otherwise the largest tolerance, which is what a passing forgery can hide in an output."""
        tolerances = self.tolerances(xs)
        if np.all(np.abs(self.residues(xs, ys)) <= tolerances[:, None]):
            return float(tolerances.max())
        return None


class FieldCheck:
    """Freivalds' check of one ``blinded`` stage, ``v = W_q u mod p``: exact."""

    def __init__(self, weights: SparseMatrix, vectors: int = FIELD_VECTORS) -> None:
        self._weights = weights
        self._vectors = vectors
        self.redraw()

    def redraw(self) -> None:
        """Fresh secret vectors in ``Z_p`` and their products with ``W_q``."""
        r = uniform_residues(P, self._vectors * self._weights.shape[0]).astype(np.int64).reshape(self._vectors, -1)
        self._r = SparseMatrix.from_dense(r)
        self._rw = SparseMatrix.from_dense(_left_product_mod(r, self._weights))

    def check(self, inputs: np.ndarray, outputs: np.ndarray) -> float | None:
        """``None`` unless ``R v = (R W_q) u mod p`` for every query's padded input ``u`` and output ``v``;
        otherwise zero: in the field nothing but the exact result passes, so a forgery hides nothing."""
        if all(np.array_equal(self._r.apply_mod(v), self._rw.apply_mod(u)) for u, v in zip(inputs, outputs)):
            return 0.0
        return None


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
