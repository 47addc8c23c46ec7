"""One RNS limb of a CKKS polynomial: SEAL's NTT form, computed on numpy arrays.

The enclave decrypts and encrypts a ciphertext per layer, and through sealapi
each one crossed Python as a list of 4096 floats and a zstd-compressed file.
Here a polynomial is a ``uint64`` array per prime and the transforms run in C
(``he/_rns.c``); the tables use SEAL's own root for each prime, so the result is
bit-for-bit SEAL's NTT form (``tests/he/test_rns.py`` checks it against SEAL's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np

from . import _rns


def shoup(values: np.ndarray, q: int) -> np.ndarray:
    """``floor(w * 2^64 / q)`` for each ``w < q``: what lets C multiply by ``w`` mod ``q`` without dividing."""
    return np.array([(int(w) << 64) // q for w in values], dtype=np.uint64)


def _bit_reversed(n: int) -> np.ndarray:
    bits = n.bit_length() - 1
    return np.array([int(f"{k:0{bits}b}"[::-1], 2) for k in range(n)], dtype=np.int64)


def _powers(root: int, n: int, q: int) -> np.ndarray:
    out, acc = [], 1
    for _ in range(n):
        out.append(acc)
        acc = acc * root % q
    return np.array(out, dtype=np.uint64)


@dataclass(frozen=True)
class Limb:
    """The NTT tables of one prime ``q`` for polynomials of degree ``n``."""

    q: int
    n: int
    roots: np.ndarray = field(repr=False)
    roots_shoup: np.ndarray = field(repr=False)
    inv_roots: np.ndarray = field(repr=False)
    inv_roots_shoup: np.ndarray = field(repr=False)
    n_inv: int = field(repr=False)
    n_inv_shoup: int = field(repr=False)

    def forward(self, poly: np.ndarray) -> None:
        """Coefficients to NTT form, in place."""
        _rns.ntt_forward(poly, self.roots, self.roots_shoup, self.q)

    def inverse(self, poly: np.ndarray) -> None:
        """NTT form to coefficients, in place."""
        _rns.ntt_inverse(poly, self.inv_roots, self.inv_roots_shoup, self.q, self.n_inv, self.n_inv_shoup)

    def multiply_accumulate(self, acc: np.ndarray, x: np.ndarray, w: np.ndarray, w_shoup: np.ndarray) -> None:
        """``acc += x * w (mod q)`` pointwise, in place; ``w_shoup`` is ``shoup(w, q)``."""
        _rns.multiply_accumulate(acc, x, w, w_shoup, self.q)

    def add(self, acc: np.ndarray, x: np.ndarray) -> None:
        """``acc += x (mod q)`` for residues in ``[0, q)``, in place."""
        _rns.add(acc, x, self.q)

    def negate(self, residues: np.ndarray) -> np.ndarray:
        """``-x (mod q)`` for residues in ``[0, q)``."""
        return np.where(residues == 0, residues, np.uint64(self.q) - residues)

    def reduce(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Signed integers (``int64``) as residues in ``[0, q)``, into ``out`` if given."""
        out = np.empty(values.shape, dtype=np.uint64) if out is None else out
        _rns.reduce(out, np.ascontiguousarray(values, dtype=np.int64), self.q)
        return out

    def centered(self, residues: np.ndarray) -> np.ndarray:
        """Residues as the integers of least absolute value they stand for, as float64."""
        out = np.empty(residues.shape, dtype=np.float64)
        _rns.centered(out, np.ascontiguousarray(residues), self.q)
        return out


def minimal_root(q: int, n: int) -> int:
    """The least primitive ``2n``-th root of unity mod ``q``: the root SEAL's NTT tables are built on."""
    if (q - 1) % (2 * n):
        raise ValueError(f"{q} is not 1 mod {2 * n}: it has no NTT of degree {n}.")
    for x in range(2, q):
        root = pow(x, (q - 1) // (2 * n), q)
        if pow(root, n, q) == q - 1:
            break
    square, best, power = root * root % q, root, root
    for _ in range(n - 1):
        power = power * square % q
        best = min(best, power)
    return best


@cache
def limb(q: int, n: int) -> Limb:
    """The tables for prime ``q`` and degree ``n``, built once per process."""
    psi = minimal_root(q, n)
    rev = _bit_reversed(n)
    powers, inv_powers = _powers(psi, n, q), _powers(pow(psi, -1, q), n, q)
    roots, inv_roots = powers[rev], inv_powers[rev]
    n_inv = pow(n, -1, q)
    return Limb(q, n, roots, shoup(roots, q), inv_roots, shoup(inv_roots, q), n_inv, (n_inv << 64) // q)
