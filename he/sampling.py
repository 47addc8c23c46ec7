"""The two distributions of an RLWE encryption, drawn from the operating system's CSPRNG.

SEAL's symmetric encryption of zero is ``(-(a s + e), a)`` with ``a`` uniform
modulo each prime and ``e`` from a centered binomial distribution over 21 coin
pairs (standard deviation about 3.24, SEAL's default noise sampler). The enclave
draws the same two distributions here for its own encryptions
(``SecretKeySet.key_mask`` and ``encrypt_masked``); ``tests/he/test_sampling.py``
checks the distributions and that SEAL decrypts the result.

Randomness is AES-256 in counter mode under a key from ``os.urandom``
(``getrandom``; Gramine serves it from RDRAND inside an SGX enclave): a seed
expanded by a stream cipher, as SEAL expands its seeds with BLAKE2 or SHAKE,
because ``getrandom`` alone costs more than the NTTs here. Each thread keeps
one keystream and takes a fresh key after ``REKEY_BYTES``: setting up a cipher
costs about 0.15 ms, more than most draws. Never numpy's generators.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

NOISE_PAIRS = 21
NOISE_VARIANCE = NOISE_PAIRS / 2
REKEY_BYTES = 1 << 30

_LOCAL = threading.local()


def random_words(count: int) -> np.ndarray:
    """``count`` uniformly random 64-bit words from this thread's AES-256-CTR keystream."""
    size = 8 * count
    if getattr(_LOCAL, "left", 0) < size:
        _LOCAL.stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
        _LOCAL.left = REKEY_BYTES
    _LOCAL.left -= size
    return np.frombuffer(_LOCAL.stream.update(bytes(size)), dtype=np.uint64)


def uniform_residues(q: int, n: int) -> np.ndarray:
    """``n`` independent values uniform in ``[0, q)``, by rejection from ``q``'s bit length."""
    mask = np.uint64((1 << q.bit_length()) - 1)
    out = np.empty(0, dtype=np.uint64)
    while len(out) < n:
        words = random_words(n - len(out) + 64) & mask
        out = np.concatenate([out, words[words < np.uint64(q)]])
    return out[:n]


def centered_binomial(n: int) -> np.ndarray:
    """``n`` values ``popcount(x) - popcount(y)`` over 21-bit random ``x, y``: mean 0, variance 10.5."""
    words = random_words(n)
    low = np.uint64((1 << NOISE_PAIRS) - 1)
    ones = np.bitwise_count(words & low).astype(np.int64)
    others = np.bitwise_count((words >> np.uint64(NOISE_PAIRS)) & low).astype(np.int64)
    return ones - others


def gaussian(count: int) -> np.ndarray:
    """``count`` standard normal values by Box-Muller over the CSPRNG's uniform 53-bit fractions."""
    words = random_words(2 * count) >> np.uint64(11)
    uniform = (words.astype(np.float64) + 0.5) / float(1 << 53)
    radius = np.sqrt(-2.0 * np.log(uniform[:count]))
    return radius * np.cos(2.0 * np.pi * uniform[count:])
