"""Back-pressure and faults with real processes: a full queue answers 'busy', a dead enclave times out."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from heclave.parties.data_owner import DataOwner
from heclave.parties.model_owner import ModelOwner
from heclave.parties.processes import Cluster
from heclave.protocol.errors import HeclaveError
from heclave.protocol.messages import Message, decode, encode
from heclave.workloads import INPUT_SHAPE, train_digits_cnn
from tests.helpers import DATA_OWNER, DEV, MODEL_OWNER, raw_socket


def _deploy_digits(cluster: Cluster, seed: int, weights: str, count: int) -> tuple[str, np.ndarray, np.ndarray]:
    """Train the digits CNN, deploy it, and return its id, ``count`` inputs and their plaintext logits."""
    model, x, _ = train_digits_cnn(epochs=2, seed=seed)
    with torch.no_grad():
        reference = model.double()(torch.from_numpy(x[:count]).double()).numpy()
    owner = ModelOwner(cluster.endpoint, cluster.server_key_file, MODEL_OWNER, DEV)
    model_id = owner.deploy(owner.plan(model.float(), INPUT_SHAPE, weights), readers=[DATA_OWNER.public])
    owner.close()
    return model_id, x[:count], reference


@pytest.fixture(scope="module")
def small_cluster(cluster_with):
    """A server with a queue of one and a short enclave timeout, whose enclave the tests kill."""
    with cluster_with("--max-queue", "1", "--enclave-timeout", "3") as running:
        yield running, *_deploy_digits(running, seed=3, weights="plain", count=4)


def _sockets(cluster, n):
    socks = [raw_socket(cluster) for _ in range(n)]
    time.sleep(0.5)  # let the CURVE handshakes finish so the burst really arrives at once
    return socks


def test_a_burst_beyond_the_queue_gets_busy_and_good_requests_still_succeed(small_cluster):
    cluster, model_id, x, reference = small_cluster
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    graph = owner.graph(model_id)
    frames = [owner.context(model_id).encrypt(r) for r in graph.stages[0].layout.gather_batch(x[:1])]
    socks = _sockets(cluster, 8)
    for sock in socks:  # full inferences that fail only at release (their authorisation is garbage)
        content = {"model_id": model_id, "session_id": b"s" * 16, "request_id": "r", "envelope": b"e" * 40}
        sock.send_multipart(encode(Message("infer", content, frames)))
    codes = []
    for sock in socks:
        assert sock.poll(60_000), "every request gets exactly one reply"
        codes.append(decode(sock.recv_multipart()).content.get("code"))
        sock.close()
    assert codes.count("busy") >= 1, codes
    assert set(codes) <= {"busy", "unknown_session"}, codes
    inference = owner.infer(model_id, x[1])
    got, noise = inference.logits, inference.noise_sd
    assert np.argmax(got) == np.argmax(reference[1]) and np.abs(got - reference[1]).max() < 1e-3 + 6 * noise
    owner.close()


def test_a_dead_enclave_fails_the_request_in_bounded_time_and_service_resumes(small_cluster):
    cluster, model_id, x, reference = small_cluster
    owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV, timeout_s=30)
    owner.graph(model_id)
    enclave = cluster.children[0].process
    killer = threading.Timer(0.01, enclave.kill)
    killer.start()
    started = time.monotonic()
    with pytest.raises(HeclaveError) as info:
        for sample in x:  # one of these is in flight when the enclave dies
            owner.infer(model_id, sample)
        time.sleep(5)
        owner.infer(model_id, x[0])
    assert time.monotonic() - started < 25
    assert info.value.code.value == "enclave_unavailable" and "Retry" in info.value.message, info.value
    cluster.restart_enclave()
    fresh = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV)
    got = fresh.infer(model_id, x[2]).logits
    assert np.argmax(got) == np.argmax(reference[2])
    fresh.close()


def test_a_supervising_server_restarts_its_enclave_and_keeps_serving_without_redeploying(cluster_with):
    with cluster_with("--spawn-enclave", "--enclave-timeout", "5") as cluster:
        model_id, x, reference = _deploy_digits(cluster, seed=4, weights="encrypted", count=3)
        os.kill(cluster.children[1].wait_ready()["enclave_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                data_owner = DataOwner(cluster.endpoint, cluster.server_key_file, DATA_OWNER, DEV, timeout_s=60)
                inference = data_owner.infer(model_id, x[0])
                break
            except HeclaveError:
                assert time.monotonic() < deadline, "the enclave never came back"
                time.sleep(0.5)
        got, noise = inference.logits, inference.noise_sd
        assert np.argmax(got) == np.argmax(reference[0]) and np.abs(got - reference[0]).max() < 1e-3 + 6 * noise
        data_owner.close()


def test_loadtest_command_answers_every_request_correctly():
    import json
    import subprocess
    import sys
    from pathlib import Path

    heclave = str(Path(sys.executable).parent / "heclave")
    done = subprocess.run(
        [heclave, "loadtest", "--clients", "3", "--requests", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["sent"] == 12 and report["lost"] == 0 and report["correct"] == report["sent"]
    for key in (
        "answered",
        "errors",
        "latency_ms_p50",
        "latency_ms_p95",
        "throughput_rps",
        "server_peak_rss_mb",
        "enclave_peak_rss_mb",
    ):
        assert key in report


def _stopped(pid: int, timeout_s: float) -> bool:
    """True once ``pid`` has exited: gone, or a zombie that its new parent has not reaped yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_server_takes_its_workers_and_supervised_enclave_with_it(cluster_with):
    with cluster_with("--spawn-enclave", "--workers", "2") as cluster:
        status = cluster.children[1].wait_ready()
        children = [status["enclave_pid"], *status["worker_pids"]]
        assert len(children) == 3
        cluster.children[1].process.kill()
        cluster.children[1].process.wait()
        assert all(_stopped(pid, 10) for pid in children), "a killed server's children kept running"
