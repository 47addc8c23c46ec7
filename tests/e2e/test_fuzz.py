"""Fuzzing the message handlers: whatever arrives, exactly one well-formed reply, and the process lives.

`make test` runs a few hundred examples; `make fuzz` sets HECLAVE_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heclave.graph.params import CkksParams
from heclave.he.context import SecretKeySet
from heclave.he.serialize import to_bytes
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.parties.worker import WorkerService
from heclave.protocol.errors import CiphertextError, ErrorCode
from heclave.protocol.messages import PROTOCOL_VERSION, Message, decode, encode
from heclave.protocol.transport import Client, handle_frames, read_public_key
from heclave.tee.enclave import Enclave
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, layer_output, raw_socket, undeploy

EXAMPLES = int(os.environ.get("HECLAVE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
CODES = {c.value for c in ErrorCode}
FIELDS = [
    "model_id",
    "session_id",
    "request_id",
    "envelope",
    "graph",
    "masks",
    "stage",
    "batch",
    "handshake",
    "handshake_id",
    "sizes",
    "stream",
    "part",
    "sealed_bytes",
]
TYPES = [
    "evidence",
    "open_session",
    "confirm_session",
    "register_model",
    "grant",
    "undeploy",
    "activate",
    "deploy",
    "model_info",
    "infer",
    "part",
    "install",
    "uninstall",
    "evaluate",
    "x",
]

KNOWN_MODELS: list[str] = []
WORKER = WorkerService()
_VALID_CT = SecretKeySet(CkksParams()).public.encrypt(np.linspace(-1, 1, 64))


@st.composite
def ciphertexts(draw) -> bytes:
    """A valid ciphertext, truncated or with one byte flipped, or as it is."""
    data = bytearray(_VALID_CT)
    how = draw(st.sampled_from(["as is", "truncated", "flipped"]))
    if how == "truncated":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "flipped":
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


model_ids = st.builds(lambda i: KNOWN_MODELS[i % len(KNOWN_MODELS)] if KNOWN_MODELS else "none", st.integers(0, 9))
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=64) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
contents = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=6)
buffers = st.lists(st.binary(max_size=2048) | ciphertexts(), max_size=4)


@st.composite
def requests(draw) -> list[bytes]:
    """Well-formed headers with hostile content, or raw garbage frames."""
    if draw(st.booleans()):
        return draw(st.lists(st.binary(max_size=256), max_size=4))
    bufs = draw(buffers)
    content = draw(contents)
    if draw(st.booleans()):
        content["model_id"] = draw(model_ids)
    header = {
        "v": draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, "1"])),
        "type": draw(st.sampled_from(TYPES)),
        "id": draw(st.text(min_size=1, max_size=8)),
        "content": content,
        "nbuf": draw(st.sampled_from([len(bufs), len(bufs), len(bufs) + 1])),
    }
    return [msgpack.packb(header, use_bin_type=True), *bufs]


def _assert_one_reply(frames: list[bytes]) -> None:
    reply = decode(frames)
    assert reply.type in ("ok", "error")
    if reply.type == "error":
        assert reply.content["code"] in CODES and isinstance(reply.content["message"], str)
        # "internal" would mean hostile input reached a code path that did not expect it.
        assert reply.content["code"] != "internal", reply.content["message"]


@pytest.fixture(scope="module")
def enclave() -> Enclave:
    return Enclave()


@FUZZ
@given(frames=requests())
def test_enclave_handler_answers_anything_with_one_reply(enclave, frames):
    _assert_one_reply(handle_frames(frames, enclave.handle))


@FUZZ
@given(frames=requests())
def test_worker_handler_answers_anything_with_one_reply(frames):
    _assert_one_reply(handle_frames(frames, WORKER.handle))


@pytest.fixture(scope="module")
def deployed(cluster):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    KNOWN_MODELS.append(owner.deploy(owner.plan(model, (6,), "encrypted"), readers=[DATA_OWNER.public]))
    owner.close()
    yield KNOWN_MODELS[-1]
    undeploy(cluster, *KNOWN_MODELS)
    KNOWN_MODELS.clear()


@FUZZ
@given(frames=requests())
def test_server_process_answers_anything_and_keeps_serving(cluster, deployed, frames):
    sock = raw_socket(cluster)
    try:
        sock.send_multipart(frames if frames else [b""])
        assert sock.poll(30_000), "no reply"
        _assert_one_reply(sock.recv_multipart())
    finally:
        sock.close()


def test_server_still_serves_after_the_fuzzing(cluster, deployed):
    with Client(cluster.endpoint, read_public_key(cluster.server_key_file), timeout_s=30) as client:
        assert client.request(Message("evidence")).content["evidence"]["runtime"] == "native"
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    assert len(owner.infer(deployed, np.ones(6)).logits) == 3
    owner.close()
    cluster.check()


def test_enclave_keeps_serving_after_the_fuzzing(enclave):
    reply = decode(handle_frames(encode(Message("evidence")), enclave.handle))
    assert reply.type == "ok" and len(reply.buffers) == 1


@pytest.fixture(scope="module")
def output_frame(keys) -> bytes:
    return to_bytes(layer_output(keys, np.linspace(-1, 1, 64), np.ones(64), None))


@FUZZ
@given(st.integers(0, 2**40), st.integers(1, 255), st.integers(0, 400), st.binary(max_size=64))
def test_damaged_layer_outputs_are_decrypted_or_refused_never_anything_else(
    keys, output_frame, position, flip, cut, junk
):
    """The enclave's own parser (he.sealformat) on damaged frames: a CiphertextError or some slots."""
    flipped = bytearray(output_frame)
    flipped[position % len(flipped)] ^= flip
    for frame in (bytes(flipped), output_frame[:cut] + junk, output_frame[: len(output_frame) - cut] + junk, junk):
        try:
            slots = keys.decrypt_output(frame)
        except CiphertextError:
            continue
        assert slots.shape == (keys.params.slots,)
