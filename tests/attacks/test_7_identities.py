"""Who may do what: replayed handshakes, strangers, other identities' models, and floods of sessions,
models and requests, each from the attacker's side against the real enclave and server."""

from __future__ import annotations

import secrets

import msgpack
import numpy as np
import pytest
import torch

from heclave.parties import server
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.protocol.channel import OwnerHandshake, Session
from heclave.protocol.errors import ErrorCode, HeclaveError
from heclave.protocol.evidence import Evidence
from heclave.protocol.identity import Identity
from heclave.protocol.messages import Message
from heclave.protocol.transport import Client, read_public_key
from heclave.tee import models, requests, sessions
from tests.helpers import DATA_OWNER, MODEL_OWNER

from .tools import ATTACKER, DEV, Operator, assert_close, deploy, random_input, two_layers


def _refused(code: ErrorCode, call, *args) -> HeclaveError:
    with pytest.raises(HeclaveError) as info:
        call(*args)
    assert info.value.code is code, info.value.message
    return info.value


def _handshake(operator: Operator, identity: Identity) -> tuple[Session, bytes, bytes, bytes]:
    """An owner's handshake relayed verbatim by the operator, who records its messages."""
    evidence = Evidence.from_wire(operator.ask("evidence", {}).content["evidence"])
    handshake = OwnerHandshake(identity.static, evidence.identity_public, evidence.digest())
    first = handshake.first()
    answer = operator.ask("open_session", {"handshake": first})
    third, session = handshake.finish(answer.content["handshake"])
    confirmed = operator.ask("confirm_session", {"handshake_id": answer.content["handshake_id"], "handshake": third})
    assert confirmed.content["session_id"] == session.session_id
    return session, first, answer.content["handshake_id"], third


def _model_info(operator: Operator, session: Session, model_id: str) -> tuple[dict, Message]:
    content = {
        "model_id": model_id,
        "session_id": session.session_id,
        "envelope": session.seal(msgpack.packb({"model_id": model_id}), b"model_info"),
    }
    return content, operator.ask("model_info", content)


# --- fresh sessions --------------------------------------------------------------------------------------------------


def test_a_replayed_handshake_opens_nothing_and_resets_nothing(operator, victim, still_serves):
    session, first, handshake_id, third = _handshake(operator, DATA_OWNER)
    used, reply = _model_info(operator, session, victim.model_id)
    session.open(reply.content["binding"], b"model:" + victim.model_id.encode())

    again = operator.ask("open_session", {"handshake": first})
    assert again.content["handshake"][:32] != third[:32], "the enclave answered a replay with its old ephemeral key"
    _refused(
        ErrorCode.CHANNEL,
        operator.ask,
        "confirm_session",
        {"handshake_id": again.content["handshake_id"], "handshake": third},
    )
    _refused(
        ErrorCode.UNKNOWN_SESSION, operator.ask, "confirm_session", {"handshake_id": handshake_id, "handshake": third}
    )
    _refused(ErrorCode.CHANNEL, operator.ask, "model_info", used)

    _, reply = _model_info(operator, session, victim.model_id)
    binding = reply.content["binding"]
    assert int.from_bytes(binding[16:24], "big") == 1, "the enclave's counter went back: a nonce would repeat"
    session.open(binding, b"model:" + victim.model_id.encode())
    still_serves()


def test_a_replayed_inference_request_releases_nothing(cluster, honest, victim, still_serves):
    x = random_input(victim)
    request = honest.prepare(victim.model_id, x[None])
    assert_close(honest.send(request).result, victim.reference(x)[0])
    eavesdropper = Client(cluster.endpoint, read_public_key(cluster.server_key_file), timeout_s=60)
    try:
        _refused(ErrorCode.CHANNEL, eavesdropper.request, request)
    finally:
        eavesdropper.close()
    still_serves()


# --- query rights and ownership --------------------------------------------------------------------------------------


def test_a_data_owner_the_model_does_not_name_is_refused(cluster, operator, victim, still_serves):
    stranger = DataOwner(cluster.endpoint, cluster.server_key_file, Identity.generate(), DEV)
    try:
        _refused(ErrorCode.FORBIDDEN, stranger.graph, victim.model_id)
        session = stranger.connection.session
        request_id = secrets.token_hex(8)
        authorisation = {"model_id": victim.model_id, "batch": 1, "input": np.zeros(victim.inputs).tobytes()}
        content = {
            "model_id": victim.model_id,
            "session_id": session.session_id,
            "request_id": request_id,
            "envelope": session.seal(msgpack.packb(authorisation), b"infer:" + request_id.encode()),
        }
        _refused(ErrorCode.FORBIDDEN, operator.ask, "begin", content)
    finally:
        stranger.close()
    still_serves()


def test_another_identity_cannot_undeploy_or_regrant_a_model(cluster, victim, still_serves):
    thief = ModelOwner(cluster.endpoint, cluster.server_key_file, ATTACKER, DEV)
    try:
        _refused(ErrorCode.FORBIDDEN, thief.undeploy, victim.model_id)
        _refused(ErrorCode.FORBIDDEN, thief.grant, victim.model_id, [ATTACKER.public], True)
    finally:
        thief.close()
    still_serves()


def test_the_owner_grants_revokes_and_undeploys_and_the_enclave_forgets_the_model(cluster, honest):
    model = deploy(cluster, two_layers(21))
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    try:
        x = random_input(model)
        assert_close(honest.infer(model.model_id, x).result, model.reference(x)[0])
        owner.grant(model.model_id, [])
        _refused(ErrorCode.FORBIDDEN, honest.infer, model.model_id, x)
        owner.grant(model.model_id, [DATA_OWNER.public_hex])
        assert_close(honest.infer(model.model_id, x).result, model.reference(x)[0])
        owner.undeploy(model.model_id)
    finally:
        owner.close()
    assert not (cluster.workdir / "enclave-state" / "models" / f"{model.model_id}.sealed").exists()
    assert not list((cluster.workdir / "server-state" / "models").glob(f"{model.model_id}*"))
    _refused(ErrorCode.UNKNOWN_MODEL, honest.infer, model.model_id, x)


def test_a_registered_model_is_uploaded_only_by_the_client_that_registered_it(cluster, honest):
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    squatter = ModelOwner(cluster.endpoint, cluster.server_key_file, ATTACKER, DEV)
    try:
        net = two_layers(22)
        plan = owner.plan(net, (16,), "encrypted")
        registration = owner.register(plan, [DATA_OWNER.public])
        forged = squatter.plan(two_layers(23), (16,), "encrypted")
        refused = _refused(ErrorCode.FORBIDDEN, squatter.upload, forged, registration)
        assert "another client" in refused.message
        owner.upload(plan, registration)
    finally:
        owner.close()
        squatter.close()
    x = random_input()
    with torch.no_grad():
        want = net.double()(torch.from_numpy(x)).numpy()
    assert_close(honest.infer(registration.model_id, x).result, want)


# --- floods ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh(cluster_with):
    """A cluster of its own, whose quotas the floods below may fill, with a legitimate owner's model."""
    with cluster_with() as running:
        model = deploy(running, two_layers(31))
        yield running, model


def _still_served(cluster, model) -> None:
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        x = random_input(model)
        assert_close(owner.infer(model.model_id, x).result, model.reference(x)[0])
    finally:
        owner.close()


def test_one_identity_opening_sessions_without_end_closes_only_its_own(fresh):
    cluster, model = fresh
    operator = Operator(cluster)
    victim = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        flooder = Identity.generate()
        opened = [_handshake(operator, flooder)[0] for _ in range(sessions.PER_IDENTITY + 8)]
        _refused(ErrorCode.UNKNOWN_SESSION, _model_info, operator, opened[0], model.model_id)
        x = random_input(model)
        assert_close(victim.infer(model.model_id, x).result, model.reference(x)[0])
    finally:
        victim.close()
        operator.close()


def test_one_identity_deploying_without_end_meets_its_quota_also_after_a_restart(fresh):
    cluster, model = fresh
    flooder = ModelOwner(cluster.endpoint, cluster.server_key_file, Identity.generate(), DEV)
    plan = flooder.plan(two_layers(41), (16,), "encrypted")
    try:
        for _ in range(models.PER_OWNER):
            flooder.deploy(plan)
        _refused(ErrorCode.QUOTA, flooder.deploy, plan)
        identity = flooder.connection.identity
    finally:
        flooder.close()
    cluster.restart_enclave()
    flooder = ModelOwner(cluster.endpoint, cluster.server_key_file, identity, DEV)
    try:
        _refused(ErrorCode.QUOTA, flooder.deploy, plan)
    finally:
        flooder.close()
    _still_served(cluster, model)
    deploy(cluster, two_layers(42))  # the legitimate owner still deploys


def test_one_client_registering_without_uploading_meets_the_servers_quota(fresh):
    cluster, model = fresh
    hoarder = ModelOwner(cluster.endpoint, cluster.server_key_file, Identity.generate(), DEV)
    try:
        plan = hoarder.plan(two_layers(43), (16,), "encrypted")
        for _ in range(server.PENDING_PER_CLIENT):
            hoarder.register(plan)
        refused = _refused(ErrorCode.QUOTA, hoarder.register, plan)
        assert "weights never came" in refused.message
    finally:
        hoarder.close()
    _still_served(cluster, model)


def test_one_identity_cannot_hold_more_requests_in_flight_than_its_share(fresh):
    cluster, model = fresh
    operator = Operator(cluster)
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    greedy = DataOwner(cluster.endpoint, cluster.server_key_file, ATTACKER, DEV)
    try:
        owner.grant(model.model_id, [DATA_OWNER.public, ATTACKER.public])
        for _ in range(requests.PER_IDENTITY):
            operator.begin(greedy, model, random_input(model))
        _refused(ErrorCode.QUOTA, operator.begin, greedy, model, random_input(model))
        _still_served(cluster, model)
    finally:
        greedy.close()
        owner.close()
        operator.close()


def test_a_flood_of_fresh_identities_is_refused_before_known_owners_are_touched(fresh):
    cluster, model = fresh
    operator = Operator(cluster)
    known = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        refused = 0
        for _ in range(sessions.NEWCOMERS + 8):
            try:
                _handshake(operator, Identity.generate())
            except HeclaveError as exc:
                assert exc.code is ErrorCode.QUOTA, exc.message
                refused += 1
        assert refused >= 8, "fresh identities must not take every session"
        x = random_input(model)
        assert_close(known.infer(model.model_id, x).result, model.reference(x)[0])
        known.connection.reopen()  # a known identity still gets a new session
        assert_close(known.infer(model.model_id, x).result, model.reference(x)[0])
    finally:
        known.close()
        operator.close()


def test_sealed_records_swapped_on_the_host_are_refused_at_restart(fresh):
    cluster, model = fresh
    victim = deploy(cluster, two_layers(51))
    other = deploy(cluster, two_layers(52))
    sealed = cluster.workdir / "enclave-state" / "models"
    first, second = sealed / f"{victim.model_id}.sealed", sealed / f"{other.model_id}.sealed"
    swapped = second.read_bytes()
    second.write_bytes(first.read_bytes())
    first.write_bytes(swapped)
    cluster.restart_enclave()
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        for refused in (victim, other):  # neither model runs under the other's record (weights, keys, rights)
            _refused(ErrorCode.UNKNOWN_MODEL, owner.graph, refused.model_id)
    finally:
        owner.close()
    _still_served(cluster, model)
    assert "another model" in cluster.children[0].log_path.read_text()
