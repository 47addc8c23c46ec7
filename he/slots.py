"""CKKS slots and polynomial coefficients, through numpy's FFT.

A plaintext polynomial ``m`` of degree ``n`` carries ``n/2`` complex slots: slot
``i`` is ``m(zeta^(3^i)) / scale`` with ``zeta = exp(i pi / n)``, SEAL's ordering
(its rotations are the automorphisms ``X -> X^(3^r)``). The conjugate points
``zeta^(-3^i)`` carry the conjugate slots, which is what makes ``m`` real.
"""

from __future__ import annotations

import numpy as np

# Coefficients must fit int64 to be reduced exactly; SEAL's own encoder refuses values near its modulus too.
MAX_COEFFICIENT = 2.0**62


class SlotCodec:
    """Encode slots to integer coefficients and decode coefficients to slots, for ring degree ``n``.

    Folding ``m`` to the ``n/2`` complex numbers ``w_j = m_j + i m_(j+n/2)``
    makes the evaluations at ``zeta^(4k+1)`` one length-``n/2`` FFT of
    ``w_j zeta^j`` (since ``zeta^(n/2 (4k+1)) = i``); every slot is one of those
    or the conjugate of one, because exactly one of ``3^i`` and ``-3^i`` is 1 mod 4.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.slots = n // 2
        powers = np.array([pow(3, i, 2 * n) for i in range(self.slots)], dtype=np.int64)
        self._conjugated = powers % 4 == 3
        # The slot's evaluation point zeta^(4k+1), or that of its conjugate; k indexes the half-length FFT.
        self._position = np.where(self._conjugated, 2 * n - powers, powers) // 4
        self._twist = np.exp(1j * np.pi * np.arange(self.slots) / n)

    def decode(self, coefficients: np.ndarray, scale: float) -> np.ndarray:
        """The complex slots of the polynomial with these (float64) coefficients at this scale."""
        folded = coefficients[: self.slots] + 1j * coefficients[self.slots :]
        evaluations = np.fft.ifft(folded * self._twist)[self._position] * (self.slots / scale)
        return np.where(self._conjugated, np.conj(evaluations), evaluations)

    def encode(self, values: np.ndarray, scale: float) -> np.ndarray:
        """The rounded integer coefficients (int64) whose slots are ``values`` (zero-padded) at this scale."""
        values = np.asarray(values)
        count = len(values)
        if count > self.slots:
            raise ValueError(f"{count} values do not fit in {self.slots} slots.")
        evaluations = np.zeros(self.slots, dtype=np.complex128)
        scaled = values * scale
        evaluations[self._position[:count]] = np.where(self._conjugated[:count], np.conj(scaled), scaled)
        folded = np.fft.fft(evaluations) / (self._twist * self.slots)
        coefficients = np.rint(np.concatenate([folded.real, folded.imag]))
        if not np.all(np.abs(coefficients) < MAX_COEFFICIENT):
            # The values themselves are secret: the message says only that they were too large.
            raise OverflowError(f"The values are too large to encode at scale 2^{np.log2(scale):.0f}.")
        return coefficients.astype(np.int64)
