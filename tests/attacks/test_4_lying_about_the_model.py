"""A malicious server operator lying to the data owner about the model, or about a plain or blinded layer."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest

from heclave.arith.blinding import P
from heclave.graph.placement import Placement
from heclave.graph.release import ReleasePolicy
from heclave.parties.data_owner import DataOwner
from heclave.plan.exposure import exposure
from heclave.protocol.errors import ChannelError, ErrorCode, HeclaveError, PlanError
from heclave.protocol.messages import Message
from tests.helpers import DATA_OWNER

from .tools import (
    DEV,
    Deployed,
    assert_close,
    deployed,
    random_input,
    two_layers,
)

BAD, INTEGRITY = ErrorCode.BAD_CIPHERTEXT, ErrorCode.INTEGRITY


# --- 8. a server lying to the data owner about the model -------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_first(cluster) -> Iterator[Deployed]:
    """A model whose first layer runs in the clear on the server: it sees the input."""
    yield from deployed(cluster, two_layers(14), placements=["plain", "he"])


def test_the_lying_servers_faithful_relay_gives_the_data_owner_the_model(lying_server, victim, operator):
    """Control for the lies below: the relay itself works."""
    liar = lying_server()
    owner = DataOwner(liar.endpoint, liar.key_file, DATA_OWNER, DEV)
    try:
        assert owner.graph(victim.model_id).to_bytes() == victim.plan.graph.to_bytes()
    finally:
        owner.close()
    assert liar.received == ["evidence", "open_session", "confirm_session", "model_info"]


LIES = [
    "graph says the first layer is plain",
    "graph says another release policy",
    "the operator's own public key",
    "another model's public key",
    "the reply for another model",
]


def _hooks(lie: str, victim: Deployed, plain_first: Deployed, operators_key: bytes, other_key: bytes) -> dict:
    """How the lying server rewrites the enclave's ``model_info`` reply (``tamper``) or the request (``rewrite``)."""
    graph = {
        # The victim's architecture with its first layer in the clear: the server would see the input.
        "graph says the first layer is plain": plain_first.plan.graph,
        "graph says another release policy": dataclasses.replace(victim.plan.graph, release=ReleasePolicy(decimals=8)),
    }.get(lie)
    if graph is not None:
        return {"tamper": lambda content, buffers: ({**content, "graph": graph.to_bytes()}, buffers)}
    # A public key whose secret key the operator holds (it could read the input), or another model's.
    context = {"the operator's own public key": operators_key, "another model's public key": other_key}.get(lie)
    if context is not None:
        return {"tamper": lambda content, buffers: (content, [context])}
    # The data owner asked about the victim; the server asks the enclave about the plain-first model.
    return {"rewrite": lambda m: Message(m.type, {**m.content, "model_id": plain_first.model_id}, m.buffers)}


@pytest.mark.parametrize("lie", LIES)
def test_the_data_owner_sends_nothing_when_the_server_lies_about_the_model(
    lying_server, operator, victim, twin, plain_first, keys, lie, still_serves
):
    """A server of the operator's making relays to the real enclave but lies in the model_info reply: the data
    owner (who would even accept a plain first layer) refuses the model before anything is encrypted or sent."""
    other_key = operator.bundle(twin.model_id).context
    liar = lying_server(**_hooks(lie, victim, plain_first, keys.public.to_bytes(), other_key))
    owner = DataOwner(liar.endpoint, liar.key_file, DATA_OWNER, DEV, allow_plain_input=True)
    try:
        with pytest.raises(ChannelError):
            owner.infer(victim.model_id, random_input(victim))
    finally:
        owner.close()
    assert "infer" not in liar.received and liar.received[-1] == "model_info"
    still_serves()


def test_the_data_owner_sends_nothing_to_a_plain_first_model_unless_it_allows_it(cluster, plain_first, still_serves):
    assert plain_first.plan.graph.stages[0].placement is Placement.PLAIN
    x = random_input()
    careful = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        assert careful.graph(plain_first.model_id).stages[0].placement is Placement.PLAIN
        sent = careful.connection.client.bytes_sent
        with pytest.raises(PlanError):
            careful.infer(plain_first.model_id, x)
        assert careful.connection.client.bytes_sent == sent, "something was sent"
    finally:
        careful.close()
    consenting = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV, allow_plain_input=True)
    try:
        assert_close(consenting.infer(plain_first.model_id, x).result, plain_first.reference(x)[0])
    finally:
        consenting.close()
    still_serves()


@pytest.mark.parametrize("consent", [False, None, "yes", 1])
def test_the_enclave_hands_no_input_to_the_server_without_the_data_owners_consent(
    operator, attacker, plain_first, consent, still_serves
):
    """An authorisation (sealed by the data owner) that does not say allow_plain_input=True, exactly."""
    session = attacker.connection.session
    attacker.graph(plain_first.model_id)
    authorisation = {"model_id": plain_first.model_id, "batch": 1, "input": random_input().astype("<f8").tobytes()}
    if consent is not None:
        authorisation["allow_plain_input"] = consent
    request_id = secrets.token_hex(12)
    envelope = session.seal(msgpack.packb(authorisation), b"infer:" + request_id.encode())
    content = {
        "session_id": session.session_id,
        "request_id": request_id,
        "model_id": plain_first.model_id,
        "batch": 1,
        "envelope": envelope,
    }
    with pytest.raises(HeclaveError) as info:
        operator.ask("begin", content)
    assert info.value.code == ErrorCode.PLAN
    with pytest.raises(HeclaveError) as info:
        operator.ask("activate", {**content, "stage": 0, "form": "plain"}, [np.zeros(8).astype("<f8").tobytes()])
    assert info.value.code == ErrorCode.UNKNOWN_REQUEST
    still_serves(plain_first)


def test_a_plain_stages_result_is_the_servers_word_and_the_plan_says_so(operator, cluster, plain_first, still_serves):
    """A plain layer is computed unchecked (the README's threat model): what the server chooses is used, and the
    plan's exposure list tells the model owner so before deployment."""
    assert any("no one checks" in item for item in exposure(plain_first.plan.graph))
    consenting = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV, allow_plain_input=True)
    try:
        probe = operator.begin(consenting, plain_first, random_input())
        assert probe.expected == 0 and probe.form == "plain"
        chosen = np.full((1, 8), 3.0).astype("<f8").tobytes()
        reply = probe.activate([chosen])
        assert "next" in reply.content and "result" not in reply.content
    finally:
        consenting.close()
    still_serves(plain_first)


@pytest.fixture(scope="module")
def blinded_first(cluster) -> Iterator[Deployed]:
    """A model whose first layer the server computes on one-time padded field vectors (Slalom's way)."""
    yield from deployed(cluster, two_layers(16), placements=["blinded", "he"])


def test_a_blinded_stages_honest_result_passes(operator, attacker, blinded_first):
    """Control for the next test: the operator computes the blinded layer as the server does."""
    x = random_input()
    probe = operator.begin(attacker, blinded_first, x)
    assert probe.form == "blinded"
    assert_close(probe.run()[0], blinded_first.reference(x)[0])


@pytest.mark.parametrize("offset", [1, -1, 2**30])
def test_a_blinded_stages_result_off_in_one_entry_is_refused(operator, attacker, blinded_first, offset, still_serves):
    probe = operator.begin(attacker, blinded_first, random_input())
    values = np.frombuffer(probe.honest()[0], dtype="<i8").copy()
    values[3] = (values[3] + offset) % P
    probe.refused([values.tobytes()], INTEGRITY)
    still_serves(blinded_first)


def test_the_enclave_and_server_survived_every_attack(cluster, honest, victim, twin, own_model, plain_first):
    cluster.check()
    for model in (victim, twin, own_model):
        x = random_input(victim)
        assert_close(honest.infer(model.model_id, x).result, model.reference(x)[0])
