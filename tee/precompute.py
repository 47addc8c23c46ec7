"""Encryptions of zero made between requests: the enclave's offline phase for ``he`` stages.

Half of a symmetric CKKS encryption (sampling the mask and the noise and
multiplying by the secret key) does not depend on the message. The enclave
makes those encryptions of zero while it has nothing else to do and, on the
request path, only encodes the activation and adds it, as Slalom precomputes
its blinding pads. Under sustained load the pool runs dry and the same work
happens online again, so every reply reports what its precomputed zeros cost:
the enclave's total work stays visible.

Each zero is used once and then released; nothing here is ever written to disk.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from he.context import SecretKeySet

POOL_SIZE = 16


class ZeroPool:
    """Fresh encryptions of zero, each with the milliseconds it took to make."""

    def __init__(self, keys: SecretKeySet, size: int = POOL_SIZE) -> None:
        self._keys = keys
        self._size = size
        self._ready: deque = deque()

    def __len__(self) -> int:
        return len(self._ready)

    def refill(self) -> bool:
        """Make one encryption of zero if the pool is short; False when it is full."""
        if len(self._ready) >= self._size:
            return False
        started = time.perf_counter()
        zero = self._keys.encrypt_zero()
        self._ready.append((zero, (time.perf_counter() - started) * 1e3))
        return True

    def encrypt(self, values: np.ndarray) -> tuple[bytes, float]:
        """``values`` encrypted, and the offline milliseconds spent on it (0 when made on the spot)."""
        if self._ready:
            zero, offline_ms = self._ready.popleft()
        else:
            zero, offline_ms = self._keys.encrypt_zero(), 0.0
        return self._keys.encrypt_onto(zero, values), offline_ms
