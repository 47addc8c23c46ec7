"""Hostile requests over the wire, each followed by a good request from another client that must succeed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heclave.graph.params import CkksParams
from heclave.he.context import SecretKeySet
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.protocol.errors import ChannelError, HeclaveError
from heclave.protocol.messages import MAX_BUFFER_BYTES, Message, decode, encode
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, raw_socket, undeploy


@pytest.fixture(scope="module")
def model(cluster):
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    model_id = owner.deploy(owner.plan(net, (12,), "encrypted"), readers=[DATA_OWNER.public])
    owner.close()
    yield model_id, net.double().eval()
    undeploy(cluster, model_id)


@pytest.fixture
def attacker(cluster):
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    yield owner
    owner.close()


def _good_request_succeeds(cluster, model) -> None:
    model_id, net = model
    x = np.random.default_rng().normal(size=12)
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    inference = owner.infer(model_id, x)
    owner.close()
    want = net(torch.from_numpy(x)[None]).detach().numpy()[0]
    assert inference.noise_sd < 1e-3
    assert np.abs(inference.logits - want).max() < 1e-3 + 6 * inference.noise_sd


def _send(cluster, frames: list[bytes]) -> Message:
    sock = raw_socket(cluster)
    try:
        sock.send_multipart(frames)
        assert sock.poll(60_000), "no reply"
        return decode(sock.recv_multipart())
    finally:
        sock.close()


def test_oversized_buffer_is_refused_with_too_large(cluster, model):
    reply = _send(cluster, encode(Message("infer", {"model_id": model[0]}, [bytes(MAX_BUFFER_BYTES + 1)])))
    assert reply.content["code"] == "too_large"
    _good_request_succeeds(cluster, model)


def test_ciphertext_under_other_parameters_is_refused(cluster, model, attacker):
    request = attacker.prepare(model[0], np.ones((1, 12)))
    other = SecretKeySet(CkksParams(4096, (40, 20, 40), 20)).public.encrypt(np.ones(8))
    reply = _send(cluster, encode(Message("infer", request.content, [other])))
    assert reply.content["code"] == "bad_ciphertext"
    _good_request_succeeds(cluster, model)


def test_ciphertext_under_another_key_only_yields_noise_to_its_sender(cluster, model, attacker):
    request = attacker.prepare(model[0], np.ones((1, 12)))
    foreign = SecretKeySet(CkksParams()).public
    layout = attacker.graph(model[0]).stages[0].layout.gather_batch(np.ones((1, 12)))
    forged = Message("infer", request.content, [foreign.encrypt(row) for row in layout])
    try:
        released = attacker.connection.request(forged)
        assert released.type == "ok"
    except HeclaveError as exc:  # an out-of-range decryption may also be refused; either way no crash
        assert exc.code.value != "internal"
    _good_request_succeeds(cluster, model)


def test_wrong_number_of_input_ciphertexts_is_refused(cluster, model, attacker):
    request = attacker.prepare(model[0], np.ones((1, 12)))
    reply = _send(cluster, encode(Message("infer", request.content, [*request.buffers, *request.buffers])))
    assert reply.content["code"] == "bad_ciphertext"
    _good_request_succeeds(cluster, model)


def test_unknown_session_is_refused(cluster, model, attacker):
    request = attacker.prepare(model[0], np.ones((1, 12)))
    content = dict(request.content, session_id=b"\x00" * 16)
    reply = _send(cluster, encode(Message("infer", content, request.buffers)))
    assert reply.content["code"] == "unknown_session"
    _good_request_succeeds(cluster, model)


def test_replayed_request_is_refused(cluster, model, attacker):
    request = attacker.prepare(model[0], np.ones((1, 12)))
    first = attacker.connection.request(request)
    assert first.type == "ok"
    with pytest.raises(ChannelError):
        attacker.connection.request(Message("infer", request.content, request.buffers))
    _good_request_succeeds(cluster, model)


def test_a_data_owner_that_disappears_mid_request_costs_nothing(cluster, model, attacker):
    request = attacker.prepare(model[0], np.ones((1, 12)))
    sock = raw_socket(cluster)
    sock.send_multipart(encode(request))
    sock.close()  # gone before the reply: the server's ROUTER drops it
    _good_request_succeeds(cluster, model)
    cluster.check()
