"""Fixtures of the attack suite: deployed models, honest and attacking owners, the operator (see ``tools``).

The suite attacks the session's shared ``cluster`` (``tests/conftest.py``); every attack must leave it serving
honest requests (``still_serves``), and its models are undeployed when the suite ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from heclave.graph.placement import Placement
from heclave.graph.release import ReleasePolicy
from heclave.parties.data_owner import DataOwner
from tests.helpers import DATA_OWNER

from .tools import ATTACKER, DEV, INPUT, Deployed, LyingServer, Operator, assert_close, deployed, two_layers


@pytest.fixture(scope="package")
def victim(cluster) -> Iterator[Deployed]:
    """Someone else's model: the operator wants its weights, and its users' inputs and outputs."""
    yield from deployed(cluster, two_layers(11))


@pytest.fixture(scope="package")
def twin(cluster) -> Iterator[Deployed]:
    """Another model of the victim's architecture (same layouts), under its own key set."""
    yield from deployed(cluster, two_layers(12))


@pytest.fixture(scope="package")
def own_model(cluster) -> Iterator[Deployed]:
    """The operator's own one-stage model, releasing logits to 8 decimals: the best decryption oracle it can get."""
    torch.manual_seed(13)
    yield from deployed(cluster, torch.nn.Sequential(torch.nn.Linear(INPUT, 4)), release=ReleasePolicy(decimals=8))


@pytest.fixture(scope="package")
def operator(cluster):
    op = Operator(cluster)
    yield op
    op.close()


@pytest.fixture(scope="package")
def honest(cluster):
    """An honest data owner, whose requests through the real server must keep working after every attack."""
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    yield owner
    owner.close()


@pytest.fixture(scope="package")
def consenting(cluster):
    """An honest data owner who lets a model whose first layer is ``plain`` see its inputs."""
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV, allow_plain_input=True)
    yield owner
    owner.close()


@pytest.fixture
def still_serves(cluster, honest, consenting, victim) -> Callable[..., None]:
    """Check that honest requests on fresh random input still get the right logits through the real server
    (the victim's by default; a plain-first model's from a data owner who consents to it)."""

    def check(*models: Deployed) -> None:
        for model in models or (victim,):
            x = np.random.default_rng().normal(size=model.inputs)
            owner = consenting if model.plan.graph.stages[0].placement is Placement.PLAIN else honest
            assert_close(owner.infer(model.model_id, x).result, model.reference(x)[0])
        cluster.check()

    return check


@pytest.fixture
def attacker(cluster):
    """The operator acting as a data owner, with a session of its own (fresh for each test)."""
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, ATTACKER, DEV)
    yield owner
    owner.close()


@pytest.fixture
def lying_server(cluster, tmp_path):
    """Start :class:`LyingServer`\\ s with the given hooks; all are stopped at the end of the test."""
    started: list[LyingServer] = []

    def start(**hooks) -> LyingServer:
        server = LyingServer(cluster, tmp_path, **hooks)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
