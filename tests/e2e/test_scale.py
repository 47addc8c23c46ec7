"""The server's HE work on several workers: local processes and a local Ray cluster, checked against plaintext."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.workloads import INPUT_SHAPE, train_digits_cnn
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER


@pytest.fixture(scope="module")
def trained():
    model, x, _ = train_digits_cnn(epochs=3, seed=5)
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(x[:12]).double()).numpy()
    return model.float(), x[:12], reference


@pytest.mark.parametrize(
    "server_args", [("--workers", "2"), ("--ray", "local", "--workers", "2")], ids=["processes", "ray"]
)
def test_two_workers_serve_concurrent_owners_exactly(cluster_with, trained, server_args):
    model, x, reference = trained
    with cluster_with(*server_args) as cluster:
        assert cluster.children[1].wait_ready()["lanes"] == 2
        owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
        model_id = owner.deploy(owner.plan(model, INPUT_SHAPE, "encrypted", batch=4), readers=[DATA_OWNER.public])
        owner.close()
        results: dict[int, np.ndarray] = {}

        def client(part: int) -> None:
            data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
            for start in range(part * 6, part * 6 + 6, 3):
                logits = data_owner.infer_batch(model_id, x[start : start + 3]).batch_logits
                for i, row in enumerate(logits):
                    results[start + i] = row
            data_owner.close()

        threads = [threading.Thread(target=client, args=(p,)) for p in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = np.stack([results[i] for i in range(12)])
        assert (got.argmax(1) == reference.argmax(1)).all()
        assert np.abs(got - reference).max() < 1e-3 * (reference.max() - reference.min())
