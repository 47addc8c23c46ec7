"""SEAL's zstd-compressed frames at the enclave's own parser (``he.sealformat``): a frame must declare its
size, at most what a ciphertext of its level holds, and a bomb is refused without being inflated; SEAL's own
compressed ciphertexts still parse.

The attacker's side, a bomb sent to the real enclave as a layer output, is in
``tests/attacks/test_5_resources.py``.
"""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
import zstandard

from heclave.he.sealformat import COMPRESS_ZSTD, HEADER, MAGIC, parse_ciphertext, seal_version
from heclave.he.serialize import to_bytes
from heclave.protocol.errors import CiphertextError, ErrorCode
from tests.helpers import layer_output

BOMB_BYTES = 256 << 20


def zstd_frame(total: int, declare: bool = True) -> bytes:
    """A zstd frame of ``total`` zero bytes (a few KB), declaring its content size in its header or not."""
    compressor = zstandard.ZstdCompressor(write_content_size=declare).compressobj(size=total if declare else -1)
    chunk = bytes(1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(total >> 20)) + compressor.flush()


def seal_frame(body: bytes) -> bytes:
    """``body`` behind a valid SEAL header saying it is zstd-compressed."""
    return HEADER.pack(MAGIC, HEADER.size, *seal_version(), COMPRESS_ZSTD, 0, HEADER.size + len(body)) + body


def lie_about_size(frame: bytes, declared: int) -> bytes:
    """``frame`` (not single-segment, 4-byte content size) with its header's content size set to ``declared``."""
    assert zstandard.get_frame_parameters(frame).content_size < 1 << 32 and frame[4] >> 6 == 2
    return frame[:6] + declared.to_bytes(4, "little") + frame[10:]


def _peak_bytes(action) -> tuple[BaseException | None, int]:
    """What ``action`` raised and the most memory Python allocated meanwhile (zstd's output included)."""
    tracemalloc.start()
    try:
        action()
        raised = None
    except BaseException as exc:
        raised = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return raised, peak


@pytest.mark.parametrize(
    "frame, message",
    [
        (lambda: zstd_frame(BOMB_BYTES), "declares 268435456 bytes"),
        (lambda: zstd_frame(BOMB_BYTES, declare=False), "does not declare its size"),
        (lambda: lie_about_size(zstd_frame(BOMB_BYTES), 4096), "corrupt|does not hold the size"),
        (lambda: lie_about_size(zstd_frame(8 << 20), 100_000), "corrupt|does not hold the size"),
    ],
    ids=["declares-256MB", "size-undeclared", "declares-4KB-holds-256MB", "declares-100KB-holds-8MB"],
)
def test_a_zstd_bomb_is_refused_without_inflating_it(keys, frame, message):
    bomb = seal_frame(frame())
    raised, peak = _peak_bytes(lambda: parse_ciphertext(bomb, keys.output_level))
    assert isinstance(raised, CiphertextError) and raised.code is ErrorCode.BAD_CIPHERTEXT
    assert re.search(message, raised.message)
    limit = 3 * len(keys.output_level.moduli) * keys.output_level.n * 8 + 200  # a 3-polynomial ciphertext
    assert peak < limit + (1 << 20), f"{peak} bytes allocated for a frame of {len(bomb)}"


def test_seals_own_compressed_ciphertexts_still_parse(keys):
    values = np.random.default_rng().normal(size=keys.params.slots)
    frame = to_bytes(layer_output(keys, values, np.ones(keys.params.slots), None))
    assert HEADER.unpack_from(frame)[4] == COMPRESS_ZSTD
    raw = parse_ciphertext(frame, keys.output_level)
    assert raw.data.shape == (2, len(keys.output_level.moduli), keys.output_level.n)
