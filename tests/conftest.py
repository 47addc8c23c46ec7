"""Shared fixtures: one CKKS key set per test session, and real enclave + server processes."""

from __future__ import annotations

import pytest

from heclave.graph.params import CkksParams
from heclave.he.context import SecretKeySet
from heclave.parties.processes import Cluster


@pytest.fixture(scope="session")
def keys() -> SecretKeySet:
    """A real CKKS key set, as the enclave holds it (tests play the enclave's role in-process)."""
    return SecretKeySet(CkksParams())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real enclave process and a real server process on free loopback ports."""
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running
