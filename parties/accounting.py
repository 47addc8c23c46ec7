"""Where a set of inferences' compute went: the server's HE work and the enclave's.

The enclave's work has two parts: what it does on the request path, and what
it precomputed between requests for the encryptions it made (see
``tee.precompute``). The first is what a request waits for; the sum is what the
enclave must sustain once load leaves it no gaps. Both shares are reported,
never only the smaller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .data_owner import Inference


@dataclass(frozen=True)
class WorkSplit:
    """Milliseconds per image: server HE, enclave on the request path, enclave precomputed."""

    server_ms: float
    enclave_ms: float
    enclave_offline_ms: float

    @classmethod
    def of(cls, inferences: Sequence[Inference], images: int) -> WorkSplit:
        """The split for ``images`` images answered by ``inferences``."""

        def total(key: str) -> float:
            return sum(float(inf.server.get(key, 0.0)) for inf in inferences) / max(images, 1)

        return cls(total("he_ms"), total("enclave_ms"), total("enclave_offline_ms"))

    @property
    def enclave_total_ms(self) -> float:
        return self.enclave_ms + self.enclave_offline_ms

    @property
    def enclave_share(self) -> float:
        """The enclave's part of the compute a request waits for."""
        return self.enclave_ms / max(self.server_ms + self.enclave_ms, 1e-9)

    @property
    def enclave_share_with_offline(self) -> float:
        """The enclave's part of all compute, its precomputation included."""
        return self.enclave_total_ms / max(self.server_ms + self.enclave_total_ms, 1e-9)

    def to_dict(self) -> dict:
        return {
            "server_he_ms_per_image": self.server_ms,
            "enclave_ms_per_image": self.enclave_ms,
            "enclave_offline_ms_per_image": self.enclave_offline_ms,
            "enclave_share": self.enclave_share,
            "enclave_share_with_offline": self.enclave_share_with_offline,
        }
