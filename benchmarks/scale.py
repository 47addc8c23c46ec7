"""``heclave bench scale``: throughput and latency against the number of HE workers, locally and on Ray.

For each model, backend and worker count a fresh enclave and server start, the
model is deployed (encrypted weights, planned for batches), and several data
owners send batch requests concurrently. The requests are encrypted before the
clock starts: the data owners' encryption happens on their own machines in a
deployment, and on this one machine it would compete with the server for the
same two cores. Every result is checked against plaintext torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from heclave.parties.accounting import WorkSplit
from heclave.parties.data_owner import DataOwner, Inference
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster
from heclave.parties.ray_executor import ray_missing
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity

from .cnn import tutorial_cnn
from .concurrent import run_clients

MODEL_OWNER, DATA_OWNER = Identity.generate(), Identity.generate()  # this run's two parties


def vgg_small() -> nn.Sequential:
    """A VGG-style CNN on 32x32 colour images: two conv-ReLU-pool blocks and a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tutorial-cnn": (tutorial_cnn, (1, 28, 28)),
    "vgg-32": (vgg_small, (3, 32, 32)),
}


def _run(
    model: nn.Module,
    shape: tuple[int, ...],
    server_args: tuple[str, ...],
    clients: int,
    requests: int,
    batch: int,
    seed: int,
) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (clients * requests * batch, *shape)).astype(np.float32)
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(images).double()).numpy()
    with Cluster(server_args=server_args) as cluster:
        owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, VerifierPolicy.development())
        model_id = owner.deploy(owner.plan(model.float(), shape, "encrypted", batch=batch), readers=[DATA_OWNER.public])
        owner.close()
        owners = [
            DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, VerifierPolicy.development())
            for _ in range(clients)
        ]
        owners[0].infer_batch(model_id, images[:batch])  # warm-up: workers install the model
        for data_owner in owners[1:]:
            data_owner.graph(model_id)
        prepared = [
            [
                data_owner.prepare(model_id, images[(c * requests + r) * batch : (c * requests + r + 1) * batch])
                for r in range(requests)
            ]
            for c, data_owner in enumerate(owners)
        ]
        done: list[list[Inference]] = [[] for _ in owners]

        def client(c: int) -> None:
            done[c] = [owners[c].send(request) for request in prepared[c]]

        wall_s = run_clients(clients, client)
        for data_owner in owners:
            data_owner.close()
    inferences = [inf for per_client in done for inf in per_client]
    logits = np.concatenate([inf.batch_logits for inf in inferences])
    return {
        "images_per_s": len(logits) / wall_s,
        "latency_ms_p50": float(np.median([inf.latency_ms for inf in inferences])),
        **WorkSplit.of(inferences, len(logits)).to_dict(),
        "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_logit_error": float(np.abs(logits - reference).max()),
    }


def bench_scale(
    workers: list[int],
    backends: list[str],
    models: list[str],
    clients: int = 4,
    requests: int = 3,
    batch: int = 8,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict:
    """Every (model, backend, worker count) combination; returns the report ``heclave bench scale`` prints.

    A backend this machine cannot run (Ray without the ``ray`` extra) is not measured: its rows are listed
    under ``skipped`` with the reason, and the others run as usual.
    """
    torch.manual_seed(seed)
    missing = {backend: ray_missing() for backend in backends if backend == "ray"}
    runs, skipped = [], []
    for name in models:
        factory, shape = MODELS[name]
        model = factory().eval()
        for backend in backends:
            if missing.get(backend):
                skipped += [
                    {"model": name, "backend": backend, "workers": n, "reason": missing[backend]} for n in workers
                ]
                continue
            base = None
            for count in workers:
                say(f"{name}: {count} worker(s) on {backend}")
                args = ("--workers", str(count)) + (("--ray", "local") if backend == "ray" else ())
                run = {
                    "model": name,
                    "backend": backend,
                    "workers": count,
                    "batch": batch,
                    "clients": clients,
                    **_run(model, shape, args, clients, requests, batch, seed),
                }
                base = base or run["images_per_s"]
                run["speedup_vs_first"] = run["images_per_s"] / base
                runs.append(run)
    measured = [name for name in models if any(r["model"] == name for r in runs)]
    return {"benchmark": "scale", "runs": runs, "skipped": skipped, "projection": [project(n, runs) for n in measured]}


def project(model: str, runs: list[dict], workers: int = 64) -> dict:
    """Where adding workers stops helping: the enclave, one process, serves every worker's requests.

    With ``h`` ms of HE work and ``e`` ms of enclave work per image (measured, single-worker runs), ``n``
    workers deliver at most ``min(n * 1000 / h, 1000 / e)`` images/s, so scaling stops near ``n = h / e``.
    The HE time is measured with other processes competing for this machine's two cores, so on dedicated
    workers it is an upper bound, and the crossover an upper bound too.
    """
    single = [r for r in runs if r["model"] == model and r["workers"] == min(x["workers"] for x in runs)]
    he = float(np.mean([r["server_he_ms_per_image"] for r in single]))
    # Once the enclave is the bottleneck it has no gaps to precompute in: all its work counts.
    enclave = float(np.mean([r["enclave_ms_per_image"] + r["enclave_offline_ms_per_image"] for r in single]))
    return {
        "model": model,
        "he_ms_per_image": he,
        "enclave_ms_per_image": enclave,
        "enclave_bound_at_workers": he / enclave,
        f"images_per_s_at_{workers}_workers": min(workers * 1000 / he, 1000 / enclave),
        "enclave_limit_images_per_s": 1000 / enclave,
    }
