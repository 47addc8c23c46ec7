"""What every long-running process shares (``protocol.service``): one set of options, a ready file written
atomically and readable by its owner only, and a clean stop on SIGTERM, checked on the real processes."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from heclave.parties.processes import Child
from heclave.protocol.service import read_ready, write_ready

HECLAVE = str(Path(sys.executable).parent / "heclave")
SHARED = ("--bind", "--ready-file", "--exit-with-parent")


def _help(*command: str) -> str:
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_enclave_the_worker_and_the_server_take_the_same_options():
    for command in ([sys.executable, "-m", "heclave.tee"], [sys.executable, "-m", "heclave.parties.worker"]):
        text = _help(*command)
        assert all(flag in text for flag in SHARED), text
    server = _help(HECLAVE, "server")
    # The server is nobody's child: it stops on signals only.
    assert "--bind" in server and "--ready-file" in server and "--exit-with-parent" not in server


def test_a_worker_announces_itself_in_an_owner_only_file_and_stops_cleanly_on_sigterm(tmp_path):
    worker = Child("worker", ["heclave.parties.worker"], tmp_path)
    try:
        ready = worker.wait_ready(60)
        assert ready["endpoint"].startswith("tcp://127.0.0.1:")
        assert stat.S_IMODE(worker.ready_file.stat().st_mode) == 0o600
    finally:
        worker.stop()
    assert worker.process.returncode == 0, worker.tail()
    # Written through a temporary file renamed into place: none is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker.log", "worker.ready.json"]


def test_a_ready_file_reads_as_nothing_until_written(tmp_path):
    path = tmp_path / "ready.json"
    assert read_ready(path) is None
    write_ready(None, endpoint="unused")  # a process started without --ready-file writes nothing
    write_ready(path, endpoint="tcp://127.0.0.1:1", lanes=2)
    assert read_ready(path) == {"endpoint": "tcp://127.0.0.1:1", "lanes": 2}
