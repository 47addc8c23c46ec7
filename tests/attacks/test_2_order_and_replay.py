"""A malicious server operator calling stages out of order, twice, unauthorised, or replaying: refused."""

from __future__ import annotations

import secrets

import msgpack
import numpy as np
import pytest

from heclave.parties.data_owner import DataOwner
from heclave.protocol.errors import ErrorCode, HeclaveError
from tests.helpers import DATA_OWNER

from .forge import (
    with_coefficient_added,
)
from .tools import (
    DEV,
    assert_close,
    random_input,
    run_to,
)

BAD, INTEGRITY = ErrorCode.BAD_CIPHERTEXT, ErrorCode.INTEGRITY


# --- 4. stage order and authorisation --------------------------------------------------------------------------------


def test_a_stage_sent_twice_is_refused(operator, attacker, victim, still_serves):
    probe = operator.begin(attacker, victim, random_input(victim))
    first = probe.honest()
    probe.activate(first)
    assert probe.expected == 1
    probe.refused(first, ErrorCode.OUT_OF_ORDER, stage=0)
    still_serves()


@pytest.mark.parametrize("stage", [1, 2, -1])
def test_a_stage_out_of_order_is_refused(operator, attacker, victim, stage, still_serves):
    probe = operator.begin(attacker, victim, random_input(victim))
    probe.refused(probe.honest(), ErrorCode.OUT_OF_ORDER, stage=stage)
    still_serves()


def test_a_released_request_cannot_be_activated_again(operator, attacker, victim, still_serves):
    x = random_input(victim)
    probe = run_to(operator.begin(attacker, victim, x), 1)
    last = probe.honest()
    assert_close(probe.run()[0], victim.reference(x)[0])
    with pytest.raises(HeclaveError) as info:
        probe.activate(last, stage=1)
    assert info.value.code == ErrorCode.UNKNOWN_REQUEST
    still_serves()


def test_activate_without_begin_is_refused(operator, attacker, victim, still_serves):
    ctx = operator.context(victim.model_id)
    graph = operator.graph(victim.model_id)
    inputs = [ctx.encrypt(row) for row in graph.stages[0].layout.gather_batch(random_input(victim)[None])]
    frames = operator.layer(victim.model_id, 0, inputs)
    content = {"request_id": secrets.token_hex(12), "stage": 0, "form": "partials"}
    with pytest.raises(HeclaveError) as info:
        operator.ask("activate", {**content, "session_id": attacker.connection.session.session_id}, frames)
    assert info.value.code == ErrorCode.UNKNOWN_REQUEST
    with pytest.raises(HeclaveError) as info:
        operator.ask("activate", {**content, "session_id": secrets.token_bytes(16)}, frames)
    assert info.value.code == ErrorCode.UNKNOWN_SESSION
    still_serves()


def test_a_request_cannot_be_driven_from_another_session(cluster, operator, attacker, victim, still_serves):
    x = random_input(victim)
    probe = operator.begin(attacker, victim, x)
    other = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    try:
        content = {**probe.ids, "session_id": other.connection.session.session_id, "stage": 0, "form": "partials"}
        with pytest.raises(HeclaveError) as info:
            operator.ask("activate", content, probe.honest())
        assert info.value.code == ErrorCode.UNKNOWN_REQUEST
    finally:
        other.close()
    # The request itself is untouched: its own session still finishes it.
    assert_close(probe.run()[0], victim.reference(x)[0])
    still_serves()


@pytest.mark.parametrize("form", ["plain", "blinded", "ciphertexts", "secret"])
def test_a_result_in_another_form_than_the_stage_produces_is_refused(operator, attacker, victim, form, still_serves):
    """E.g. claiming the he stage is 'plain' to hand the enclave an activation of the server's choosing."""
    probe = operator.begin(attacker, victim, random_input(victim))
    chosen = np.full((1, 8), 7.0).astype("<f8").tobytes()
    probe.refused([chosen], ErrorCode.BAD_FIELD, form=form)
    still_serves()


# --- 10. repeated probing and replays --------------------------------------------------------------------------------


def test_begin_replayed_with_the_same_envelope_is_refused(operator, attacker, victim, still_serves):
    x = random_input(victim)
    probe = operator.begin(attacker, victim, x)
    with pytest.raises(HeclaveError) as info:
        operator.ask("begin", dict(probe.infer.content))
    assert info.value.code == ErrorCode.CHANNEL
    # The first request goes on undisturbed; once released, a replay is refused just the same.
    assert_close(probe.run()[0], victim.reference(x)[0])
    with pytest.raises(HeclaveError) as info:
        operator.ask("begin", dict(probe.infer.content))
    assert info.value.code == ErrorCode.CHANNEL
    still_serves()


def test_a_second_authorisation_for_an_open_request_id_is_refused(operator, attacker, victim, still_serves):
    x = random_input(victim)
    probe = operator.begin(attacker, victim, x)
    session = attacker.connection.session
    again = {
        "model_id": victim.model_id,
        "batch": 1,
        "input": random_input(victim).tobytes(),
        "allow_plain_input": False,
    }
    envelope = session.seal(msgpack.packb(again), b"infer:" + probe.request_id.encode())
    with pytest.raises(HeclaveError) as info:
        operator.ask("begin", {**probe.infer.content, "envelope": envelope})
    assert info.value.code == ErrorCode.OUT_OF_ORDER
    assert_close(probe.run()[0], victim.reference(x)[0])
    still_serves()


BEGIN_CHANGES = {
    "to the operator's own model": lambda c, own: {**c, "model_id": own.model_id},
    "to a batch of two": lambda c, own: {**c, "batch": 2},
    "to another request id": lambda c, own: {**c, "request_id": secrets.token_hex(12)},
}


@pytest.mark.parametrize("change", list(BEGIN_CHANGES))
def test_begin_with_the_authorisation_redirected_is_refused(
    operator, attacker, victim, own_model, change, still_serves
):
    request = attacker.prepare(victim.model_id, random_input(victim)[None])
    with pytest.raises(HeclaveError) as info:
        operator.ask("begin", BEGIN_CHANGES[change](dict(request.content), own_model))
    assert info.value.code == ErrorCode.CHANNEL
    still_serves()


def test_repeated_probes_all_fail_and_honest_requests_succeed_between_them(operator, attacker, victim, still_serves):
    """After each integrity failure the check's vectors are redrawn; nothing a probe learnt helps the next."""
    rng = np.random.default_rng()
    for _ in range(4):
        probe = run_to(operator.begin(attacker, victim, random_input(victim)), int(rng.integers(2)))
        frames = probe.honest()
        ctx = probe.context
        frames[0] = with_coefficient_added(
            ctx, frames[0], int(rng.integers(1, 2**50)), int(rng.integers(3)), int(rng.integers(8192))
        )
        probe.refused(frames, INTEGRITY)
        still_serves()
    x = random_input(victim)
    assert_close(operator.begin(attacker, victim, x).run()[0], victim.reference(x)[0])
