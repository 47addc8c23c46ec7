"""Release of the final output: reduced to what the deployment allows, then sealed.

The enclave never hands out a raw CKKS decryption. It first floods the output
with Gaussian noise ``FLOOD`` times the largest perturbation its checks could
have let through (``tee.verify``): a server that hides a small, key-dependent
term in a layer output under the check's tolerance moves the released
distribution by at most ``1/FLOOD`` of its standard deviation, and reading that
term back takes on the order of ``FLOOD^2`` requests per released value (see
the README's threat model). Then logits are rounded to the deployment's
precision, or reduced to the top-k labels or the label alone.
"""

from __future__ import annotations

import msgpack
import numpy as np

from heclave.graph.release import ReleaseMode, ReleasePolicy
from heclave.protocol.channel import Session


def reduce_output(y: np.ndarray, policy: ReleasePolicy, noise_sd: float = 0.0) -> dict:
    """The released form of output ``y`` under ``policy``; logits say how much flooding noise they carry."""
    if policy.mode is ReleaseMode.LOGITS:
        return {"mode": policy.mode.value, "logits": np.round(y, policy.decimals).tolist(), "noise_sd": noise_sd}
    order = np.argsort(-y, kind="stable")
    if policy.mode is ReleaseMode.TOPK:
        return {"mode": policy.mode.value, "topk": order[: policy.k].tolist()}
    return {"mode": policy.mode.value, "label": int(order[0])}


FLOOD = 16.0


def flood(ys: np.ndarray, bound: float, normals: np.ndarray) -> np.ndarray:
    """``ys`` plus ``normals`` (standard normal draws, one per value) scaled to ``FLOOD * bound``."""
    return ys + FLOOD * bound * normals.reshape(ys.shape)


def seal_result(session: Session, request_id: str, ys: np.ndarray, policy: ReleasePolicy, noise_sd: float) -> bytes:
    """Seal the released outputs of a batch, already flooded with noise of ``noise_sd``, to the data owner's
    session; the request id is authenticated."""
    payload = msgpack.packb({"results": [reduce_output(y, policy, noise_sd) for y in ys]}, use_bin_type=True)
    return session.seal(payload, associated=b"result:" + request_id.encode())
