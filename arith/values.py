"""Plain activation values as they cross a process boundary: one buffer of 8-byte numbers, checked."""

from __future__ import annotations

import numpy as np

from heclave.protocol.errors import ErrorCode, ProtocolError


def parse_values(buffers: tuple[bytes, ...] | list[bytes], dtype: str, shape: tuple[int, int], what: str) -> np.ndarray:
    """One buffer holding a ``shape`` array of ``dtype``, or a :class:`ProtocolError` naming ``what``."""
    if len(buffers) != 1 or len(buffers[0]) != shape[0] * shape[1] * 8:
        raise ProtocolError(
            f"The {what} must be one buffer of {shape[0]}x{shape[1]} 8-byte values.", ErrorCode.BAD_FIELD
        )
    return np.frombuffer(buffers[0], dtype=dtype).reshape(shape)
