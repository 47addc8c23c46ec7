"""Shared fixtures: one CKKS key set per test session, and real enclave + server processes.

``cluster`` is one enclave and one server for the whole session, shared by every suite that needs the
default processes (``tests/attacks/`` included). A suite that needs other server flags, or a cluster whose
state it may ruin, starts its own with ``cluster_with`` and says why.

Suites leave the shared cluster as they found it: every model they deploy is undeployed again, because they
all deploy under the one ``MODEL_OWNER``, which may own only 8 models at a time (``tee.models.PER_OWNER``).
A fixture that deploys undeploys at its teardown (``helpers.undeploy``, ``attacks.tools.deployed``); what a
test deploys itself is undeployed after it (``_undeploy_what_the_test_deployed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from heclave.graph.params import CkksParams
from heclave.he.context import SecretKeySet
from heclave.parties.processes import Cluster
from tests.helpers import deployed_models, undeploy


@pytest.fixture(scope="session")
def keys() -> SecretKeySet:
    """A real CKKS key set, as the enclave holds it (tests play the enclave's role in-process)."""
    return SecretKeySet(CkksParams())


@pytest.fixture(scope="session")
def cluster_with(tmp_path_factory) -> Callable[..., Cluster]:
    """A real enclave and server of one's own, the server started with extra flags:
    ``with cluster_with("--workers", "2") as cluster:`` starts both on free loopback ports and always stops
    them."""

    def new(*server_args: str) -> Cluster:
        return Cluster(tmp_path_factory.mktemp("cluster"), server_args=server_args)

    return new


@pytest.fixture(scope="session")
def cluster(cluster_with) -> Iterator[Cluster]:
    """The real enclave process and real server process that every suite shares."""
    with cluster_with() as running:
        yield running


@pytest.fixture(autouse=True)
def _undeploy_what_the_test_deployed(request) -> Iterator[None]:
    """Undeploy, after a test on the shared cluster, the models the test itself deployed.

    Fixtures of a wider scope are set up before this one, so the models they deploy are not counted as the
    test's; they undeploy their own.
    """
    if "cluster" not in request.fixturenames:
        yield
        return
    shared = request.getfixturevalue("cluster")
    before = deployed_models(shared)
    yield
    undeploy(shared, *(deployed_models(shared) - before))
