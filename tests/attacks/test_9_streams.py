"""A malicious operator and the frames a large model travels in: refused, nothing half-registered, still serving.

A model's secrets go to the enclave as several sealed chunks, each bound to its position, their number and the
total (``protocol.channel``); its server-side weights go to the server as a stream of bounded parts
(``protocol.streams``). The operator, relaying an honest model owner, reorders, drops, repeats and truncates the
sealed chunks, and declares a total past the enclave's limit: each is refused with a stable code and nothing is
registered. A deployment cut off midway, one with a frame of the wrong size and one whose weights a worker refuses
leave no bundle and no deployment at the server; the owner's upload can be retried, and the next honest
deployment and inference work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import torch

from heclave.graph.params import CkksParams
from heclave.parties.bundles import MAX_WEIGHT_BYTES, SUFFIX
from heclave.parties.model_owner import ModelOwner, Registration
from heclave.plan import Plan, plan_pytorch
from heclave.protocol.channel import Session, seal_chunks
from heclave.protocol.errors import ErrorCode, HeclaveError
from heclave.protocol.evidence import Evidence
from heclave.protocol.messages import Message, MessageType
from heclave.protocol.streams import CHUNK_BYTES, parts_of
from heclave.tee.enclave import MAX_SECRETS_BYTES
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, deployed_models, open_session

from .test_5_resources import _reset_peak, _status_kb
from .tools import assert_close, deploy

WIDE = 1024


def _refused(code: ErrorCode, call: Callable, *args) -> HeclaveError:
    with pytest.raises(HeclaveError) as info:
        call(*args)
    assert info.value.code is code, info.value.message
    return info.value


@pytest.fixture(scope="module")
def heavy_secrets() -> tuple[torch.nn.Module, Plan]:
    """A model whose secrets for the enclave (the 2048x1025 matrix of an ``enclave`` stage, 34 MB) take 3 chunks."""
    torch.manual_seed(61)
    net = torch.nn.Sequential(torch.nn.Linear(WIDE, 2 * WIDE))
    plan = plan_pytorch(net, (WIDE,), params=CkksParams(), placements=["enclave"])
    return net.double().eval(), plan


@pytest.fixture(scope="module")
def wide() -> tuple[torch.nn.Module, Plan]:
    """A model whose server-side weights take several parts: two encrypted diagonals and a ``plain`` 2048x1025
    matrix (34 MB, 3 chunks)."""
    torch.manual_seed(62)
    net = torch.nn.Sequential(torch.nn.Linear(16, WIDE), torch.nn.ReLU(), torch.nn.Linear(WIDE, 2 * WIDE))
    plan = plan_pytorch(net, (16,), params=CkksParams(), placements=["he", "plain"])
    return net.double().eval(), plan


def _sealed(operator, plan: Plan) -> tuple[Session, dict, list[bytes]]:
    """An honest model owner's registration as its server relays it: a fresh session (the handshake relayed by
    the operator), the ``register_model`` content and the sealed chunks of the owner's secrets."""
    evidence = Evidence.from_wire(operator.ask(MessageType.EVIDENCE, {}).content["evidence"])
    session = open_session(operator.enclave.request, evidence, MODEL_OWNER)
    graph = plan.graph.to_bytes()
    weights, biases = ModelOwner._enclave_secrets(plan)
    secrets = {
        "graph": hashlib.sha256(graph).digest(),
        "weights": weights,
        "biases": biases,
        "masks": ModelOwner._masks(plan),
        "readers": [DATA_OWNER.public],
        "anyone": False,
    }
    payload = msgpack.packb(secrets)
    content = {"graph": graph, "session_id": session.session_id, "sealed_bytes": len(payload)}
    return session, content, seal_chunks(session, payload, b"register")


TAMPERED = [
    ("reordered", lambda e, total: ([e[1], e[0], *e[2:]], total), ErrorCode.CHANNEL),
    ("one dropped", lambda e, total: ([e[0], *e[2:]], total), ErrorCode.INCOMPLETE),
    ("one repeated", lambda e, total: ([e[0], e[1], e[1], *e[2:]], total), ErrorCode.INCOMPLETE),
    ("one repeated in another's place", lambda e, total: ([e[0], e[0], *e[2:]], total), ErrorCode.CHANNEL),
    ("cut after a whole chunk", lambda e, total: (e[:-1], (len(e) - 1) * CHUNK_BYTES), ErrorCode.CHANNEL),
    ("cut inside the last chunk", lambda e, total: ([*e[:-1], e[-1][:-64]], total), ErrorCode.CHANNEL),
    ("another total declared", lambda e, total: (e, total - 1), ErrorCode.CHANNEL),
]


@pytest.mark.parametrize("case, tamper, code", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_tampered_sealed_chunks_are_refused_and_nothing_is_registered(
    cluster, operator, heavy_secrets, still_serves, case, tamper, code
):
    _, content, envelopes = _sealed(operator, heavy_secrets[1])
    assert len(envelopes) == 3, "the secrets are meant to take several chunks"
    before = deployed_models(cluster)
    chunks, total = tamper(envelopes, content["sealed_bytes"])
    _refused(code, operator.ask, MessageType.REGISTER_MODEL, {**content, "sealed_bytes": total}, chunks)
    assert deployed_models(cluster) == before
    still_serves()


def test_a_declared_total_past_the_limit_is_refused_before_anything_is_allocated_or_opened(
    cluster, operator, heavy_secrets, still_serves
):
    enclave = cluster.children[0].process.pid
    _, content, envelopes = _sealed(operator, heavy_secrets[1])
    before = deployed_models(cluster)
    baseline = _reset_peak(enclave)
    for total in (MAX_SECRETS_BYTES + 1, 1 << 40):
        declared = {**content, "sealed_bytes": total}
        _refused(ErrorCode.TOO_LARGE, operator.ask, MessageType.REGISTER_MODEL, declared, envelopes)
    # Receiving the 34 MB message costs its copies; allocating the declared total would cost 512 MB more.
    assert _status_kb(enclave, "VmHWM") - baseline < MAX_SECRETS_BYTES // 2 // 1024
    assert deployed_models(cluster) == before
    # Nothing was opened, so the owner's session is still in step: the same chunks, honestly declared, register.
    reply = operator.ask(MessageType.REGISTER_MODEL, content, envelopes)
    assert reply.content["model_id"] in deployed_models(cluster) - before
    still_serves()


# --- the server's side: the weights' stream ---------------------------------------------------------------------------


def _owner(cluster) -> ModelOwner:
    return ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)


@pytest.fixture
def registered(cluster, wide):
    """The wide model registered by an honest owner, its weights not yet uploaded: ``(owner, plan, registration,
    items)``; the owner is closed at the end."""
    owner = _owner(cluster)
    plan = wide[1]
    registration = owner.register(plan, [DATA_OWNER.public])
    items = owner._server_weights(plan, registration.context, registration.masks)
    yield owner, plan, registration, items
    owner.close()


def _begin(owner: ModelOwner, registration: Registration, sizes: list[int]) -> str:
    content = {"model_id": registration.model_id, "masks": registration.masks, "sizes": sizes}
    return owner.connection.request(Message(MessageType.DEPLOY, content)).content["stream"]


def _part(owner: ModelOwner, stream: str, index: int, frames) -> Message:
    return owner.connection.request(Message(MessageType.PART, {"stream": stream, "part": index}, frames))


def _nothing_at_the_server(cluster, honest, model_id: str) -> None:
    assert not (cluster.workdir / "server-state" / "models" / f"{model_id}{SUFFIX}").exists()
    x = np.random.default_rng().normal(size=16)
    _refused(ErrorCode.UNKNOWN_MODEL, honest.infer, model_id, x)


def _serves(honest, net: torch.nn.Module, model_id: str, inputs: int = 16) -> None:
    x = np.random.default_rng().normal(size=inputs)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert_close(honest.infer(model_id, x).result, want)


def test_a_deployment_cut_off_midway_leaves_nothing_and_the_owner_may_upload_again(
    cluster, honest, wide, registered, still_serves
):
    owner, plan, registration, items = registered
    parts = list(parts_of(items))
    assert len(parts) >= 3, "the weights are meant to take several parts"
    stream = _begin(owner, registration, [len(i) for i in items])
    for index in range(2):
        _part(owner, stream, index, parts[index])
    owner.close()  # the connection is gone, half of the weights sent
    _nothing_at_the_server(cluster, honest, registration.model_id)
    again = _owner(cluster)  # the same identity, so the same transport client that registered
    try:
        again.upload(plan, registration)
    finally:
        again.close()
    _serves(honest, wide[0], registration.model_id)
    still_serves()


def test_a_frame_of_the_wrong_size_ends_the_stream_and_leaves_nothing(cluster, honest, registered, still_serves):
    owner, _, registration, items = registered
    parts = list(parts_of(items))
    stream = _begin(owner, registration, [len(i) for i in items])
    _part(owner, stream, 0, parts[0])
    short = [bytes(parts[1][0])[:-1], *parts[1][1:]]
    refused = _refused(ErrorCode.INCOMPLETE, _part, owner, stream, 1, short)
    assert "begin it again" in refused.message
    _refused(ErrorCode.INCOMPLETE, _part, owner, stream, 2, parts[2])
    _refused(ErrorCode.INCOMPLETE, _part, owner, stream, 0, parts[0])
    _nothing_at_the_server(cluster, honest, registration.model_id)
    still_serves()


def test_a_declaration_that_does_not_fit_is_refused_before_any_weight(cluster, honest, registered):
    owner, _, registration, items = registered
    sizes = [len(i) for i in items]
    refused = _refused(ErrorCode.TOO_LARGE, _begin, owner, registration, [*sizes[:-1], MAX_WEIGHT_BYTES + 1])
    assert "nothing was kept" in refused.message
    refused = _refused(ErrorCode.PLAN, _begin, owner, registration, sizes[1:])
    assert "carries 2 weight items; its stages need 3 (stage 0: 2 encrypted diagonals" in refused.message
    _refused(ErrorCode.BAD_FIELD, _begin, owner, registration, "a lot")
    _nothing_at_the_server(cluster, honest, registration.model_id)


def test_weights_a_worker_refuses_leave_nothing_and_an_honest_upload_still_deploys(
    cluster, honest, wide, registered, still_serves
):
    owner, plan, registration, items = registered
    garbage = [np.random.default_rng().bytes(len(items[0])), *items[1:]]
    stream = _begin(owner, registration, [len(i) for i in garbage])
    parts = list(parts_of(garbage))
    for index, frames in enumerate(parts[:-1]):
        _part(owner, stream, index, frames)
    _refused(ErrorCode.BAD_CIPHERTEXT, _part, owner, stream, len(parts) - 1, parts[-1])
    _nothing_at_the_server(cluster, honest, registration.model_id)
    owner.upload(plan, registration)
    _serves(honest, wide[0], registration.model_id)
    still_serves()


def test_after_the_attacks_honest_large_deployments_and_inferences_work(cluster, honest, heavy_secrets, wide):
    """Through the real server: the enclave-heavy model (3 sealed chunks, no server weights at all) and the
    server-heavy one (several parts)."""
    enclave_heavy = deploy(cluster, heavy_secrets[0].float(), (WIDE,), placements=["enclave"])
    _serves(honest, heavy_secrets[0], enclave_heavy.model_id, WIDE)
    server_heavy = deploy(cluster, wide[0].float(), (16,), placements=["he", "plain"])
    _serves(honest, wide[0], server_heavy.model_id)
