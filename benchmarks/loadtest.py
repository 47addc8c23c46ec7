"""``heclave loadtest``: many data owners at once against real processes, every answer checked.

Each client is a separate data owner (its own socket and secure session) that
sends its requests one after another on the workload's held-out inputs; every released logit
vector is compared with plaintext torch. A request is *lost* if no reply came
back at all, an *error* if the reply was an error, *correct* if the labels agree
and the logits are within 1e-3 of the logit range.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster, peak_rss_mb
from heclave.protocol.errors import HeclaveError, NoReplyError
from heclave.protocol.evidence import VerifierPolicy
from heclave.protocol.identity import Identity
from heclave.workloads import Workload

from .concurrent import run_clients


@dataclass
class _Tally:
    sent: int = 0
    answered: int = 0
    correct: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, code: str) -> None:
        with self.lock:
            self.errors[code] = self.errors.get(code, 0) + 1


def _client(
    cluster: Cluster,
    model_id: str,
    identity: Identity,
    x: np.ndarray,
    reference: np.ndarray,
    requests: int,
    offset: int,
    tally: _Tally,
) -> None:
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, identity, VerifierPolicy.development(), timeout_s=120)
    spread = float(reference.max() - reference.min())
    try:
        for r in range(requests):
            i = (offset + r) % len(x)
            with tally.lock:
                tally.sent += 1
            try:
                inference = owner.infer(model_id, x[i])
            except NoReplyError:
                with tally.lock:
                    tally.lost += 1
                continue
            except HeclaveError as exc:
                tally.error(exc.code.value)
                continue
            good = inference.label == int(np.argmax(reference[i])) and (
                np.abs(inference.logits - reference[i]).max() < 1e-3 * spread
            )
            with tally.lock:
                tally.answered += 1
                tally.correct += int(good)
                tally.latencies_ms.append(inference.latency_ms)
    finally:
        owner.close()


def loadtest(clients: int, requests: int, weights: str, workload: Workload, say: Callable[[str], None] = print) -> dict:
    """Run the load test on ``workload``; returns the report ``heclave loadtest`` prints."""
    say(f"model owner: training {workload.model_name}")
    model, x, _ = workload.train()
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(x).double()).numpy()
    say("starting enclave and server")
    with Cluster() as cluster:
        owner = ModelOwner(cluster.endpoint, cluster.server_key_file, Identity.generate(), VerifierPolicy.development())
        readers = [Identity.generate() for _ in range(clients)]  # one identity per data owner
        model_id = owner.deploy(
            owner.plan(model.float(), workload.input_shape, weights), readers=[r.public for r in readers]
        )
        owner.close()
        say(f"{clients} data owners sending {requests} requests each")
        tally = _Tally()
        wall_s = run_clients(
            clients, lambda c: _client(cluster, model_id, readers[c], x, reference, requests, c * requests, tally)
        )
        cluster.check()
        rss = {child.name: child.peak_rss_mb() for child in cluster.children}
        workers = [peak_rss_mb(pid) for pid in cluster.children[1].wait_ready().get("worker_pids", [])]
    latencies = np.asarray(tally.latencies_ms) if tally.latencies_ms else np.zeros(1)
    return {
        "clients": clients,
        "requests_per_client": requests,
        "weights": weights,
        "sent": tally.sent,
        "answered": tally.answered,
        "correct": tally.correct,
        "errors": sum(tally.errors.values()),
        "error_codes": tally.errors,
        "lost": tally.lost,
        "latency_ms_p50": float(np.percentile(latencies, 50)),
        "latency_ms_p95": float(np.percentile(latencies, 95)),
        "throughput_rps": tally.answered / wall_s,
        "server_peak_rss_mb": rss.get("server", float("nan")),
        "enclave_peak_rss_mb": rss.get("enclave", float("nan")),
        "worker_peak_rss_mb": max(workers, default=float("nan")),
    }
