"""``heclave bench placements``: the seed systems' partitions of one model, through the real processes.

Every strategy is a list of placements for the same model (a VGG-style CNN on
32x32 inputs with random weights), deployed to one enclave and server and timed
on the same inputs in one run:

- full enclave: every layer in the enclave (the TEE-only baseline);
- Slalom: every linear layer blinded with one-time pads, the enclave removes ``W r``;
- Origami: blinded layers up to the cut, plain execution after it;
- eNNclave: public layers in plain on the server, the private tail in the enclave;
- heclave: every linear layer under CKKS on the server, exact nonlinearities in the enclave.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from heclave.parties.accounting import WorkSplit
from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster
from heclave.plan.exposure import exposure
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity

from .scale import vgg_small

MODEL_OWNER, DATA_OWNER = Identity.generate(), Identity.generate()  # this run's two parties
SHAPE = (3, 32, 32)
STRATEGIES: dict[str, list[str]] = {
    "full-enclave": ["enclave", "enclave", "enclave"],
    "slalom": ["blinded", "blinded", "blinded"],
    "origami": ["blinded", "plain", "plain"],
    "ennclave": ["plain", "plain", "enclave"],
    "heclave-he": ["he", "he", "he"],
}


def bench_placements(
    requests: int = 5, weights: str = "encrypted", seed: int = 0, say: Callable[[str], None] = print
) -> dict:
    """Latency, enclave share, bytes moved and exposure of every strategy; the ``bench placements`` report."""
    torch.manual_seed(seed)
    model = vgg_small().eval()
    images = np.random.default_rng(seed).uniform(0, 1, (requests, *SHAPE))
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(images)).numpy()
    results = []
    with Cluster() as cluster:
        for name, placements in STRATEGIES.items():
            say(f"{name}: deploying")
            owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, VerifierPolicy.development())
            plan = owner.plan(model, SHAPE, weights, placements=placements, name=name)
            model_id = owner.deploy(plan, readers=[DATA_OWNER.public])
            owner.close()
            # The bench compares every strategy, the plain-first ones included: its data owner consents.
            data_owner = DataOwner(
                cluster.endpoint,
                cluster.server_key_file,
                DATA_OWNER,
                VerifierPolicy.development(),
                allow_plain_input=True,
            )
            say(f"{name}: {requests} requests")
            data_owner.infer(model_id, images[0])  # warm-up: the worker installs the model
            runs = [data_owner.infer(model_id, image) for image in images]
            data_owner.close()
            logits = np.stack([run.logits for run in runs])
            work = WorkSplit.of(runs, requests)
            results.append(
                {
                    "name": name,
                    "placements": placements,
                    "latency_ms": float(np.median([run.latency_ms for run in runs])),
                    "server_ms": work.server_ms,
                    "enclave_ms": work.enclave_ms,
                    "enclave_offline_ms": work.enclave_offline_ms,
                    "enclave_share": work.enclave_share,
                    "enclave_share_with_offline": work.enclave_share_with_offline,
                    "bytes_per_image": sum(run.bytes_moved for run in runs) / requests,
                    "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
                    "max_abs_logit_error": float(np.abs(logits - reference).max()),
                    "release_noise_sd": max(run.noise_sd for run in runs),
                    "exposes": exposure(plan.graph),
                }
            )
    return {"benchmark": "placements", "model": "vgg-32", "weights": weights, "strategies": results}
