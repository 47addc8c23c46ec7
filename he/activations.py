"""How an activation crosses between the server and the enclave: its forms, and the parsing of plain ones.

Both sides use this one vocabulary: the enclave hands out and accepts
activations in these forms (``tee.execution``) and the server names the form
of what it computed (``parties.server``), so neither spells the values itself.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from heclave.protocol.errors import ErrorCode, ProtocolError


class Form(str, Enum):
    """How an activation crosses between the server and the enclave."""

    PARTIALS = "partials"  # CKKS partial sums of an ``he`` stage
    CIPHERTEXTS = "ciphertexts"  # fresh ciphertexts for the next ``he`` stage
    BLINDED = "blinded"  # x + r mod p, or the server's W (x + r) mod p
    PLAIN = "plain"  # a plaintext activation: the server sees it


def parse_values(buffers: tuple[bytes, ...] | list[bytes], dtype: str, shape: tuple[int, int], what: str) -> np.ndarray:
    """One buffer holding a ``shape`` array of ``dtype``, or a :class:`ProtocolError` naming ``what``."""
    if len(buffers) != 1 or len(buffers[0]) != shape[0] * shape[1] * 8:
        raise ProtocolError(
            f"The {what} must be one buffer of {shape[0]}x{shape[1]} 8-byte values.", ErrorCode.BAD_FIELD
        )
    return np.frombuffer(buffers[0], dtype=dtype).reshape(shape)
