"""``heclave demo``: four processes classify a workload's held-out inputs (digits by default), compared with
plaintext torch."""

from __future__ import annotations

import json
import logging
import sys
import time

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from heclave.graph.placement import WeightForm
from heclave.protocol.errors import AttestationError, HeclaveError
from heclave.protocol.evidence import PINNING, VerifierPolicy
from heclave.protocol.identity import Identity
from heclave.workloads import Workload

from .accounting import WorkSplit
from .data_owner import DataOwner
from .model_owner import ModelOwner
from .processes import Cluster


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def _summarise(
    samples: int, plain_logits: np.ndarray, labels: np.ndarray, inferences: list, deploy_s: float, weights: WeightForm
) -> dict:
    enc_logits = np.stack([inf.logits for inf in inferences])
    work = WorkSplit.of(inferences, samples)
    total_ms = sum(inf.latency_ms for inf in inferences) / samples
    encrypt_ms = sum(inf.encrypt_ms for inf in inferences) / samples
    spread = float(plain_logits.max() - plain_logits.min())
    return {
        "samples": samples,
        "weights": weights.value,
        "accuracy_plaintext": float((plain_logits.argmax(1) == labels).mean()),
        "accuracy_encrypted": float((enc_logits.argmax(1) == labels).mean()),
        "agreement": float((enc_logits.argmax(1) == plain_logits.argmax(1)).mean()),
        "max_abs_logit_error": float(np.abs(enc_logits - plain_logits).max()),
        "logit_range": spread,
        "release_noise_sd": max(inf.noise_sd for inf in inferences),
        "latency_ms_p50": _percentile([inf.latency_ms for inf in inferences], 50),
        "latency_ms_p95": _percentile([inf.latency_ms for inf in inferences], 95),
        **work.to_dict(),
        "client_encrypt_ms_per_image": encrypt_ms,
        "transport_ms_per_image": max(total_ms - work.server_ms - work.enclave_ms - encrypt_ms, 0.0),
        "bytes_per_image": sum(inf.bytes_moved for inf in inferences) / samples,
        "rotations_per_image": sum(inf.server.get("rotations", 0) for inf in inferences) / samples,
        "deploy_s": deploy_s,
    }


def _table(report: dict, data: str) -> Table:
    table = Table(title=f"heclave demo: {report['samples']} held-out {data}, {report['weights']} weights")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("plaintext accuracy", f"{report['accuracy_plaintext']:.3f}"),
        ("encrypted accuracy", f"{report['accuracy_encrypted']:.3f}"),
        ("label agreement", f"{report['agreement']:.3f}"),
        ("largest logit difference", f"{report['max_abs_logit_error']:.2e} (logit range {report['logit_range']:.1f})"),
        ("  of it, the release's flooding noise (sd)", f"{report['release_noise_sd']:.2e}"),
        ("latency per image p50 / p95", f"{report['latency_ms_p50']:.1f} / {report['latency_ms_p95']:.1f} ms"),
        ("  server HE work", f"{report['server_he_ms_per_image']:.1f} ms"),
        (
            "  enclave work, request path / precomputed",
            f"{report['enclave_ms_per_image']:.1f} / {report['enclave_offline_ms_per_image']:.1f} ms",
        ),
        ("  data-owner encryption", f"{report['client_encrypt_ms_per_image']:.1f} ms"),
        ("  transport and queuing", f"{report['transport_ms_per_image']:.1f} ms"),
        (
            "enclave share: request path / with precomputation",
            f"{report['enclave_share']:.2f} / {report['enclave_share_with_offline']:.2f}",
        ),
        ("bytes moved per image", f"{report['bytes_per_image'] / 1e6:.2f} MB"),
        ("rotations per image", f"{report['rotations_per_image']:.0f}"),
        ("deployment (plan, encrypt, upload)", f"{report['deploy_s']:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def pinned_policy() -> VerifierPolicy:
    """``--require-attestation``'s policy: it pins the SGX enclave signed in ``tee/gramine``, or nothing runs."""
    from heclave.tee.measure import GRAMINE_DIR, pinning_policy, read_sigstruct

    try:
        return pinning_policy(read_sigstruct(GRAMINE_DIR))
    except AttestationError as exc:
        raise AttestationError(
            f"--require-attestation needs a policy that pins the enclave. {exc.message} {PINNING} "
            "Or run `heclave demo` without --require-attestation for a development run."
        ) from None


def run_demo(samples: int, weights: WeightForm, as_json: bool, require_attestation: bool, workload: Workload) -> dict:
    """Run the whole demo on ``workload``; returns the report it prints."""
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    policy = pinned_policy() if require_attestation else VerifierPolicy.development()
    if not require_attestation:
        console.print(
            "[bold yellow]DEVELOPMENT RUN[/]: the enclave runs natively and presents no SGX quote; "
            "the owners accept it only because this is a demo."
        )
    with console.status(f"model owner: training {workload.model_name} on {workload.name}"):
        model, x_test, y_test = workload.train()
    count = min(samples, len(x_test))
    x, labels = x_test[:count], y_test[:count]
    with torch.no_grad():
        plain_logits = model.double()(torch.from_numpy(x).double()).numpy()
    report = _run_with_cluster(console, model, workload, x, labels, plain_logits, weights, count, policy)
    if as_json:
        print(json.dumps(report))
    else:
        Console().print(_table(report, workload.name))
    return report


def _attested(role, cluster: Cluster, identity: Identity, policy: VerifierPolicy):
    """Connect an owner under its identity, turning a refused attestation into advice for the demo."""
    try:
        return role(cluster.endpoint, cluster.server_key_file, identity, policy)
    except AttestationError as exc:
        raise AttestationError(
            f"{exc.message} Nothing was sent to the enclave. This machine runs the enclave without SGX; "
            "run `heclave demo` without --require-attestation for a development run."
        ) from None


def _run_with_cluster(
    console: Console, model, workload: Workload, x, labels, plain_logits, weights, count, policy
) -> dict:
    cluster = Cluster()
    with console.status("starting enclave and server"):
        cluster.start()
    died = cluster.watch()
    try:
        started = time.perf_counter()
        # The demo's two parties, each with an identity of its own; the model names the data owner as its reader.
        owner_identity, reader = Identity.generate(), Identity.generate()
        with console.status(f"model owner: planning and deploying with {weights.value} weights"):
            owner = _attested(ModelOwner, cluster, owner_identity, policy)
            plan = owner.plan(model.float(), workload.input_shape, weights, name=workload.model_name)
            model_id = owner.deploy(plan, readers=[reader.public])
        deploy_s = time.perf_counter() - started
        data_owner = _attested(DataOwner, cluster, reader, policy)
        inferences = []
        columns = (TextColumn("data owner: classifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("infer", total=count)
            for sample in x:
                inferences.append(data_owner.infer(model_id, sample))
                progress.advance(task)
        owner.close()
        data_owner.close()
        return _summarise(count, plain_logits, labels, inferences, deploy_s, weights)
    except (KeyboardInterrupt, HeclaveError):
        if died.is_set():
            cluster.check()
        raise
    finally:
        cluster.stop()
