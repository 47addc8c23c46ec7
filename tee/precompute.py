"""Key masks and flooding noise made between requests: the enclave's offline phase.

A symmetric CKKS encryption is ``(m + e - a s, a)``. The uniform mask ``a`` and
its product with the secret key depend on neither the message nor the noise, so
the enclave makes them while it has nothing else to do and, on the request
path, only samples the noise, encodes the activation, transforms the two once
per prime and adds, as Slalom precomputes its blinding pads. Under sustained
load the pool runs dry and the same work happens online again, so every reply
reports what its precomputed masks cost: the enclave's total work stays visible.

A mask is as secret as the key (with ``a``, ``-(a s)`` gives ``s``): each is
used once, never leaves the enclave's memory and is never written to disk.
The release's flooding noise (``tee.release``) depends on nothing at all, so
its standard normal draws are made the same way (:class:`NoisePool`).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from heclave.he.context import SecretKeySet
from heclave.he.sampling import gaussian

POOL_SIZE = 16
NOISE_POOL = 4096
NOISE_CHUNK = 1024


class MaskPool:
    """Fresh key masks, each with the milliseconds it took to make."""

    def __init__(self, keys: SecretKeySet, size: int = POOL_SIZE) -> None:
        self._keys = keys
        self._size = size
        self._ready: deque = deque()

    def __len__(self) -> int:
        return len(self._ready)

    def refill(self) -> bool:
        """Make one mask if the pool is short; False when it is full."""
        if len(self._ready) >= self._size:
            return False
        started = time.perf_counter()
        mask = self._keys.key_mask()
        self._ready.append((mask, (time.perf_counter() - started) * 1e3))
        return True

    def encrypt(self, values: np.ndarray) -> tuple[bytes, float]:
        """``values`` encrypted, and the offline milliseconds spent on it (0 when made on the spot)."""
        if self._ready:
            mask, offline_ms = self._ready.popleft()
        else:
            mask, offline_ms = self._keys.key_mask(), 0.0
        return self._keys.encrypt_masked(mask, values), offline_ms


class NoisePool:
    """Standard normal draws for the release's flooding, made in chunks between requests; each used once."""

    def __init__(self, size: int = NOISE_POOL) -> None:
        self._size = size
        self._ready = np.empty(0)
        self._ms_each = 0.0

    def __len__(self) -> int:
        return len(self._ready)

    def refill(self) -> bool:
        """Draw one chunk if the pool is short; False when it is full."""
        if len(self._ready) >= self._size:
            return False
        started = time.perf_counter()
        chunk = gaussian(NOISE_CHUNK)
        self._ms_each = (time.perf_counter() - started) * 1e3 / NOISE_CHUNK
        self._ready = np.concatenate([self._ready, chunk])
        return True

    def take(self, count: int) -> tuple[np.ndarray, float]:
        """``count`` draws, and the offline milliseconds those from the pool took (the rest are drawn now)."""
        ready = min(count, len(self._ready))
        draws = np.concatenate([self._ready[:ready], gaussian(count - ready)])
        self._ready = self._ready[ready:]
        return draws, ready * self._ms_each
