"""A malicious operator trying to exhaust the real processes' memory: refused, memory flat, still serving.

A zstd bomb (a few KB of SEAL frame whose header declares 256 MB) sent to the
enclave as a layer output, and a message of more than ``MAX_MESSAGE_BYTES`` in
buffers that are each within their own limit, sent to the enclave's socket and
to the server's. Each gets an error with a stable code, and honest requests
keep succeeding afterwards.
"""

from __future__ import annotations

import msgpack
import pytest
import zmq

from heclave.he.sealformat import COMPRESS_ZSTD, HEADER, MAGIC, seal_version
from heclave.protocol import link
from heclave.protocol.curve import CurveKeys
from heclave.protocol.errors import ErrorCode
from heclave.protocol.messages import MAX_BUFFER_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode
from heclave.protocol.transport import read_public_key
from tests.he.test_sealformat import zstd_frame

from .tools import random_input

BOMB_BYTES = 256 << 20
GROWTH_LIMIT_KB = 64 << 10


def _status_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def _reset_peak(pid: int) -> int:
    """Reset the process's peak resident set (VmHWM) to its current one, and return that (kB)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _status_kb(pid, "VmHWM")


def test_a_zstd_bomb_is_refused_with_the_enclaves_memory_flat(cluster, operator, attacker, victim, still_serves):
    enclave = cluster.children[0].process.pid
    probe = operator.begin(attacker, victim, random_input(victim))
    frames = probe.honest()
    body = zstd_frame(BOMB_BYTES)
    frames[0] = HEADER.pack(MAGIC, HEADER.size, *seal_version(), COMPRESS_ZSTD, 0, HEADER.size + len(body)) + body
    assert len(frames[0]) < 16 << 10
    before = _reset_peak(enclave)
    probe.refused(frames, ErrorCode.BAD_CIPHERTEXT)  # and the request is over
    grew = _status_kb(enclave, "VmHWM") - before
    assert grew < GROWTH_LIMIT_KB, f"the enclave's peak memory grew by {grew} kB for a {len(frames[0])}-byte frame"
    still_serves()


def _dealer(endpoint: str, server_key: bytes | None = None, token: bytes | None = None) -> zmq.Socket:
    """A raw DEALER (CURVE to ``server_key``, or presenting the enclave's link ``token``), so the test can send
    more than fits in its own memory (one buffer, sent many times)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        own = CurveKeys.generate()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, own.public, own.secret
    else:
        link.present(sock, token)
    sock.connect(endpoint)
    return sock


def _oversized(sock: zmq.Socket, mid: str) -> dict:
    """Send a message whose buffers are each within MAX_BUFFER_BYTES but sum past MAX_MESSAGE_BYTES; its reply."""
    count = MAX_MESSAGE_BYTES // MAX_BUFFER_BYTES + 1
    header = {"v": PROTOCOL_VERSION, "type": "model_info", "id": mid, "parent": None, "content": {}, "nbuf": count}
    buffer = zmq.Frame(bytes(MAX_BUFFER_BYTES))
    sock.send(msgpack.packb(header), zmq.SNDMORE)
    for i in range(count):
        sock.send(buffer, zmq.SNDMORE if i + 1 < count else 0, copy=False)
    assert sock.poll(120_000), "no reply to an oversized message"
    reply = decode(sock.recv_multipart())
    assert reply.parent == mid
    return reply.content


@pytest.mark.parametrize("target", ["enclave", "server"])
def test_a_message_over_the_total_limit_is_refused_and_serving_goes_on(cluster, target, still_serves):
    if target == "enclave":  # the operator holds the server's link token, which the enclave's socket accepts
        sock = _dealer(cluster.enclave_endpoint, token=link.read(cluster.link_token_file))
    else:
        sock = _dealer(cluster.endpoint, read_public_key(cluster.server_key_file))
    try:
        reply = _oversized(sock, f"oversized-{target}")
    finally:
        sock.close(linger=0)
    assert reply["code"] == ErrorCode.TOO_LARGE.value, reply
    assert str(MAX_MESSAGE_BYTES) in reply["message"]
    still_serves()
