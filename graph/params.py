"""CKKS encryption parameters as plain data: what a plan names and the enclave's evidence binds.

The SEAL context built from them is :func:`heclave.he.context.seal_context`;
this module needs nothing of SEAL, so the planner and the server's bookkeeping
can read parameters without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from heclave.protocol.errors import ErrorCode, ProtocolError


@dataclass(frozen=True)
class CkksParams:
    """CKKS encryption parameters: ring degree, coefficient-modulus bit sizes, scale."""

    poly_modulus_degree: int = 8192
    coeff_mod_bits: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def to_wire(self) -> dict:
        return {"n": self.poly_modulus_degree, "q": list(self.coeff_mod_bits), "scale": self.scale_bits}

    @classmethod
    def from_wire(cls, data: dict) -> CkksParams:
        try:
            n, q, s = int(data["n"]), tuple(int(b) for b in data["q"]), int(data["scale"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("CKKS parameters must be a map with n, q and scale.", ErrorCode.BAD_FIELD) from None
        if n not in (4096, 8192, 16384, 32768) or not 2 <= len(q) <= 16 or not 20 <= s <= 60:
            raise ProtocolError(f"Unsupported CKKS parameters n={n}, q={q}, scale={s}.", ErrorCode.BAD_FIELD)
        return cls(n, q, s)
