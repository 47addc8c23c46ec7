"""Resource limits that hold: bounded zstd, pads from the CSPRNG, a bound on a whole message, safe file writes.

The attacker's side of the same limits, against the real processes, is in
``tests/attacks/test_5_resources.py``.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import torch.nn as nn
import zmq
import zstandard
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from heclave.arith.blinding import P
from heclave.he.sealformat import COMPRESS_ZSTD, HEADER, MAGIC, parse_ciphertext, seal_version
from heclave.he.serialize import to_bytes
from heclave.protocol import storage, transport
from heclave.protocol.errors import CiphertextError, ErrorCode
from heclave.protocol.messages import MAX_BUFFERS, PROTOCOL_VERSION, decode
from heclave.protocol.storage import write_atomic
from heclave.protocol.transport import Received, receive, write_public_key
from tests.helpers import layer_output

ROOT = Path(__file__).resolve().parents[1]
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


def _blinded_runtime(keys):
    import torch

    from heclave.parties.model_owner import ModelOwner
    from heclave.plan import plan_pytorch
    from heclave.tee.execution import ModelRuntime

    torch.manual_seed(3)
    planned = plan_pytorch(
        nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval(), (6,), placements=["blinded", "enclave"]
    )
    weights, biases = ModelOwner._enclave_secrets(planned)
    return ModelRuntime.from_secrets(
        planned.graph, keys, {"weights": weights, "biases": biases, "masks": ModelOwner._masks(planned)}
    )


def _in_fresh_thread(action):
    """``action()`` on a new thread, which starts a keystream of its own (``he.sampling`` keeps one per thread)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(action()))
    thread.start()
    thread.join()
    return out[0]


def test_blinded_pads_are_the_aes_ctr_keystream_and_never_numpys(keys, monkeypatch):
    from heclave.he import sampling

    runtime = _blinded_runtime(keys)
    key = bytes(range(32))
    monkeypatch.setattr(sampling, "os", SimpleNamespace(urandom=lambda n: key[:n]))
    monkeypatch.setattr(np.random, "default_rng", lambda *a, **k: pytest.fail("a pad drawn from numpy's generator"))
    pad, product = _in_fresh_thread(lambda: runtime._new_pad(0))
    # What he.sampling draws: AES-256-CTR under the urandom key, 64-bit words masked to 31 bits, rejected at p.
    n = runtime.weights[0].shape[1]
    words = np.frombuffer(
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * (n + 64))), "<u8"
    )
    words = words & np.uint64((1 << 31) - 1)
    assert pad.dtype == np.int64 and pad.tolist() == words[words < P][:n].tolist()
    assert product.tolist() == runtime.weights[0].apply_mod(pad).tolist()


def test_blinded_pads_are_uniform_in_the_field_and_fresh(keys):
    runtime = _blinded_runtime(keys)
    pads = np.concatenate([runtime._new_pad(0)[0] for _ in range(3000)])
    assert pads.min() >= 0 and pads.max() < P
    counts = np.bincount((pads * 16 // P).astype(np.int64), minlength=16)
    expected = len(pads) / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 15 degrees of freedom: p < 1e-5
    assert not np.array_equal(_in_fresh_thread(lambda: runtime._new_pad(0)[0]), runtime._new_pad(0)[0])


def test_no_enclave_code_draws_from_numpy_or_pythons_random():
    """The enclave's secrets (keys, masks, pads, noise) come from ``he.sampling``'s CSPRNG only."""
    pattern = re.compile(r"np\.random|numpy\.random|^\s*(import random|from random import)", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("he", "tee", "protocol")
        for path in (ROOT / package).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


@pytest.fixture
def pair():
    """A ROUTER and a DEALER connected over loopback TCP, as the serving loops and their clients are."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    dealer.close(linger=0)
    router.close(linger=0)
    context.term()


def _header(nbuf: int, mid: str = "m-1") -> bytes:
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "evidence", "id": mid, "parent": None, "content": {}, "nbuf": nbuf}
    )


def _receive(router) -> Received:
    assert router.poll(20_000)
    return receive(router)


def test_a_message_over_the_total_limit_is_refused_keeping_only_its_header(pair, monkeypatch):
    router, dealer = pair
    monkeypatch.setattr(transport, "MAX_MESSAGE_BYTES", 1 << 20)
    chunk = bytes(300_000)
    dealer.send_multipart([_header(5), *[chunk] * 5])  # 1.5 MB in five buffers, each well within its own limit
    identity, frames, refusal, _ = _receive(router)
    assert frames == [_header(5)]  # the buffers past the limit were dropped as they came
    reply = decode(refusal)
    assert (reply.type, reply.parent, reply.content["code"]) == ("error", "m-1", "too_large")
    assert "1500" in reply.content["message"] and "exceeds" in reply.content["message"]
    dealer.send_multipart([_header(1, "m-2"), chunk])  # the next message is whole again
    _, frames, refusal, _ = _receive(router)
    assert refusal is None and frames == [_header(1, "m-2"), chunk] and decode(frames).id == "m-2"


def test_a_message_of_too_many_buffers_is_refused(pair):
    router, dealer = pair
    dealer.send_multipart([_header(MAX_BUFFERS + 1), *[b"x"] * (MAX_BUFFERS + 1)])
    _, frames, refusal, _ = _receive(router)
    reply = decode(refusal)
    assert reply.content["code"] == "too_large" and f"{MAX_BUFFERS + 1} buffers" in reply.content["message"]
    assert len(frames) == 1


def test_a_message_within_the_limits_arrives_whole(pair):
    router, dealer = pair
    sent = [_header(3), b"", bytes(range(256)) * 1000, b"\x00"]
    dealer.send_multipart(sent)
    identity, frames, refusal, _ = _receive(router)
    assert refusal is None and frames == sent and identity


def test_decode_refuses_a_whole_message_over_the_limit(monkeypatch):
    from heclave.protocol import messages

    monkeypatch.setattr(messages, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(messages.ProtocolError) as refused:
        decode([_header(2), bytes(600), bytes(600)])
    assert refused.value.code is ErrorCode.TOO_LARGE


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "server.key"
    keys = [bytes([65 + i]) * 40 for i in range(8)]
    failures: list[BaseException] = []

    def write(key: bytes) -> None:
        try:
            for _ in range(40):
                write_public_key(path, key)
                assert path.read_bytes() in {k + b"\n" for k in keys}  # whole, never half of one and half of another
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and _temporaries(tmp_path) == []


def test_public_keys_are_world_readable_and_secrets_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_public_key(tmp_path / "public.key", b"k" * 40)
    finally:
        os.umask(0o000)
    try:
        write_atomic(tmp_path / "secret", b"s")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "public.key").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert _temporaries(tmp_path) == []


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: "0" * (2 * n))
    (tmp_path / f".server.key.{'0' * 16}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_public_key(tmp_path / "server.key", b"k" * 40)
    assert victim.read_bytes() == b"untouched" and not (tmp_path / "server.key").exists()


def test_the_rename_is_made_durable_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    write_atomic(tmp_path / "state", b"new")
    assert events == ["fsync file", "rename", "fsync directory"]
    assert (tmp_path / "state").read_bytes() == b"new" and _temporaries(tmp_path) == []

    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "state", b"newer")
    assert (tmp_path / "state").read_bytes() == b"new" and _temporaries(tmp_path) == []
