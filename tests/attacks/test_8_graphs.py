"""A malicious operator registering crafted graphs at the real enclave: refused, and the enclave keeps serving.

Graphs are no longer chains: a stage names the value it reads and a step may
name another (a residual addition, a gate, a concatenation). The operator,
acting as a model owner with a session of its own, seals each crafted graph's
hash exactly as an owner would and sends ``register_model`` to the enclave's
socket: a stage reading a value that does not exist yet, a step naming a later
value or a value of another shape, a ``plain`` stage that would need a value
the server never holds, a concatenation past the enclave's activation limit,
and an index no integer type holds. Each gets the ``plan`` error; nothing is
registered, and honest requests on a residual model still get torch's logits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import torch

from heclave.graph.layouts.base import MAX_FEATURES
from heclave.protocol.channel import seal_chunks
from heclave.protocol.errors import ErrorCode, HeclaveError
from heclave.protocol.evidence import Evidence
from heclave.protocol.messages import Message, MessageType
from tests.helpers import open_session
from tests.plan.test_graph_import import ResidualAfterRelu

from .tools import ATTACKER, assert_close, deployed

Change = Callable[[dict], None]


def _stage(wire: dict, index: int) -> dict:
    return wire["stages"][index]


def _add(wire: dict) -> dict:
    return next(op for op in _stage(wire, 1)["ops"] if op["kind"] == "add")


def _reads_the_future(wire: dict) -> None:
    _stage(wire, 1)["source"] = 2


def _reads_a_huge_index(wire: dict) -> None:
    _stage(wire, 1)["source"] = 2**63


def _adds_a_later_value(wire: dict) -> None:
    _add(wire)["operand"] = 2


def _adds_another_shape(wire: dict) -> None:
    _add(wire)["operand_shape"] = [5]


def _adds_in_the_clear(wire: dict) -> None:
    _stage(wire, 1)["placement"] = "plain"


def _concatenates_past_the_limit(wire: dict) -> None:
    add = _add(wire)
    add.update(kind="concat", operand_shape=[MAX_FEATURES], dim=0, before=False)


# (id, change, what the refusal names): the graph's own fault, not the missing secrets behind it
CRAFTED: list[tuple[str, Change, str]] = [
    ("reads-the-future", _reads_the_future, "reads value 2"),
    ("reads-a-huge-index", _reads_a_huge_index, "reads value"),
    ("adds-a-later-value", _adds_a_later_value, "names value 2"),
    ("adds-another-shape", _adds_another_shape, "do not broadcast"),
    ("adds-in-the-clear", _adds_in_the_clear, "'plain'"),
    ("concatenates-past-the-limit", _concatenates_past_the_limit, "exceeds"),
]


@pytest.fixture(scope="module")
def residual(cluster):
    torch.manual_seed(3)
    # The addition's stage runs in the enclave, so it may become 'plain' without changing its layout.
    yield from deployed(cluster, ResidualAfterRelu().eval(), (4,), placements=["he", "enclave", "he"])


@pytest.fixture(scope="module")
def crafting_owner(operator):
    """The operator as a model owner: a session of its own with the enclave, opened on its socket."""
    evidence = Evidence.from_wire(operator.ask(MessageType.EVIDENCE, {}).content["evidence"])
    return open_session(operator.enclave.request, evidence, ATTACKER)


def _register(operator, session, graph: bytes) -> Message:
    vouched = {"graph": hashlib.sha256(graph).digest(), "weights": {}, "biases": {}, "masks": [], "readers": []}
    sealed = msgpack.packb(vouched)
    content = {"graph": graph, "session_id": session.session_id, "sealed_bytes": len(sealed)}
    return operator.ask(MessageType.REGISTER_MODEL, content, seal_chunks(session, sealed, b"register"))


def test_the_uncrafted_graph_gets_past_the_graph_checks(operator, crafting_owner, residual):
    """The control: the same registration with the honest graph fails only for the secrets it lacks."""
    with pytest.raises(HeclaveError) as info:
        _register(operator, crafting_owner, residual.plan.graph.to_bytes())
    assert "sealed" in info.value.message, info.value.message


@pytest.mark.parametrize("case_id, change, needle", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_a_crafted_graph_is_refused_and_the_enclave_still_serves(
    operator, crafting_owner, honest, residual, case_id, change, needle
):
    wire = msgpack.unpackb(residual.plan.graph.to_bytes(), raw=False)
    change(wire)
    with pytest.raises(HeclaveError) as info:
        _register(operator, crafting_owner, msgpack.packb(wire, use_bin_type=True))
    assert info.value.code is ErrorCode.PLAN and needle in info.value.message, info.value.message
    x = np.random.default_rng().normal(size=(4,))
    assert_close(honest.infer(residual.model_id, x).result, residual.reference(x)[0])
