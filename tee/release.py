"""Release of the final output: reduced to what the deployment allows, then sealed.

The enclave never hands out a raw CKKS decryption: logits are rounded to the
deployment's precision, or reduced to the top-k labels or the label alone.
"""

from __future__ import annotations

import msgpack
import numpy as np

from he.graph import ReleaseMode, ReleasePolicy
from protocol.channel import Session


def reduce_output(y: np.ndarray, policy: ReleasePolicy) -> dict:
    """The released form of output ``y`` under ``policy``."""
    if policy.mode is ReleaseMode.LOGITS:
        return {"mode": policy.mode.value, "logits": np.round(y, policy.decimals).tolist()}
    order = np.argsort(-y, kind="stable")
    if policy.mode is ReleaseMode.TOPK:
        return {"mode": policy.mode.value, "topk": order[: policy.k].tolist()}
    return {"mode": policy.mode.value, "label": int(order[0])}


def seal_result(session: Session, request_id: str, ys: np.ndarray, policy: ReleasePolicy) -> bytes:
    """Seal the released outputs of a batch to the data owner's session; the request id is authenticated."""
    payload = msgpack.packb({"results": [reduce_output(y, policy) for y in ys]}, use_bin_type=True)
    return session.seal(payload, associated=b"result:" + request_id.encode())
