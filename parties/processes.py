"""Starting, watching and stopping the enclave and server as real child processes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from heclave.protocol import link, service
from heclave.protocol.errors import ErrorCode, UnavailableError
from heclave.protocol.transport import Client

log = logging.getLogger(__name__)

# The server's CURVE secret key in its state directory: its identity to the parties and to the enclave.
SERVER_CURVE_SECRET = "server-curve.secret"
LINK_TOKEN = "enclave-link.token"


def peak_rss_mb(pid: int) -> float:
    """A running process's peak resident set (VmHWM) in MB; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return float("nan")


class Child:
    """One child process that reports readiness by writing a JSON file."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.ready_file = workdir / f"{name}.ready.json"
        # A file left by an earlier run of this child would point at its (dead) predecessor.
        self.ready_file.unlink(missing_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args, "--ready-file", str(self.ready_file)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Block until the child is serving; raise with its log's tail if it dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = service.read_ready(self.ready_file)
            if ready is not None:
                return ready
            self.check()
            time.sleep(0.05)
        raise UnavailableError(f"The {self.name} did not start within {timeout_s:.0f} s; see {self.log_path}.")

    def check(self) -> None:
        """Raise a clear error if the child has exited."""
        code = self.process.poll()
        if code is not None:
            raise UnavailableError(
                f"The {self.name} process exited with code {code}. Last lines of {self.log_path}:\n{self.tail()}",
                ErrorCode.ENCLAVE_UNAVAILABLE,
            )

    def peak_rss_mb(self) -> float:
        """The child's peak resident set (VmHWM) in MB, while it is still running."""
        return peak_rss_mb(self.process.pid)

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if the child does not exit in time."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class EnclaveSupervisor:
    """The enclave as a child of the server, restarted on the same endpoint whenever it dies.

    Its sealed state brings back the same keys and registered models, so a
    restart needs no redeployment; requests in flight when it died fail with a
    clear error after the server's enclave timeout. The enclave admits only
    clients presenting the token in :attr:`token_file` (``protocol.link``), which
    survives its restarts.
    """

    def __init__(self, workdir: Path, state_dir: Path, check_interval_s: float = 0.5) -> None:
        self.workdir, self.state_dir, self.interval = workdir, state_dir, check_interval_s
        self.token_file = workdir / LINK_TOKEN
        workdir.mkdir(parents=True, exist_ok=True)
        self.child = self._spawn("tcp://127.0.0.1:*")
        self.endpoint = self.child.wait_ready()["endpoint"]
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="enclave-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, bind: str) -> Child:
        args = ["heclave.tee", "--bind", bind, "--state-dir", str(self.state_dir), "--exit-with-parent"]
        return Child("enclave", [*args, "--link-token", str(self.token_file)], self.workdir)

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval):
            code = self.child.process.poll()
            if code is None:
                continue
            log.error("the enclave exited with code %s; restarting it on %s", code, self.endpoint)
            self.child.stop()
            self.child = self._spawn(self.endpoint)
            try:
                self.child.wait_ready(60)
                self.restarts += 1
                log.info("the enclave is back (restart %d)", self.restarts)
            except UnavailableError as exc:
                log.error("the enclave did not come back: %s", exc.message)

    def pid(self) -> int:
        return self.child.process.pid

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self.child.stop()


class Cluster:
    """An enclave and a server on free loopback ports; a context manager that always stops both.

    It makes the server's CURVE key pair in the server's state directory before
    starting anything, so the enclave can allow exactly that key, and hands the
    server the enclave's public key (:meth:`enclave_client` connects the same way).

    ``insecure_skip_verification`` starts the enclave without its checks of the
    server's layer results (``python -m heclave.tee --insecure-skip-verification``): only
    for measuring what they cost, as ``heclave bench cnn`` does.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        server_args: tuple[str, ...] = (),
        *,
        insecure_skip_verification: bool = False,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="heclave-demo-"))
        self.children: list[Child] = []
        self.server_args = server_args
        self.insecure_skip_verification = insecure_skip_verification
        self.endpoint = ""
        self.enclave_endpoint = ""
        self.server_key_file = self.workdir / "server.key"
        self.link_token_file = self.workdir / LINK_TOKEN
        self._stopping = False

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def start(self) -> None:
        """Start the enclave, then the server connected to it; stop both if either fails."""
        try:
            enclave = self._start("enclave", self._enclave_args("tcp://127.0.0.1:*"))
            self.enclave_endpoint = enclave.wait_ready()["endpoint"]
            server = self._start("server", self._server_args("tcp://127.0.0.1:*"))
            self.endpoint = server.wait_ready()["endpoint"]
        except BaseException:
            self.stop()
            raise

    def _server_args(self, bind: str) -> list[str]:
        return [
            "heclave.cli",
            "server",
            "--bind",
            bind,
            "--enclave",
            self.enclave_endpoint,
            "--enclave-token",
            str(self.link_token_file),
            "--key-file",
            str(self.server_key_file),
            "--state-dir",
            str(self.workdir / "server-state"),
            *self.server_args,
        ]

    def _enclave_args(self, bind: str) -> list[str]:
        args = ["heclave.tee", "--bind", bind, "--state-dir", str(self.workdir / "enclave-state")]
        args += ["--link-token", str(self.link_token_file)]
        if self.insecure_skip_verification:
            args.append("--insecure-skip-verification")
        return args

    def enclave_client(self, timeout_s: float = 60.0) -> Client:
        """A client of the enclave's socket holding the link token: what the server, or its operator, uses."""
        return Client(self.enclave_endpoint, timeout_s=timeout_s, link_token=link.read(self.link_token_file))

    def restart_enclave(self) -> None:
        """Kill the enclave and start it again on the same endpoint and sealed state, as a host might."""
        self._restart(0, self._enclave_args(self.enclave_endpoint))

    def restart_server(self) -> None:
        """Kill the server and start it again on the same endpoint and state directory."""
        self._restart(1, self._server_args(self.endpoint))

    def _restart(self, index: int, args: list[str]) -> None:
        old = self.children[index]
        old.process.kill()
        old.stop()
        self.children[index] = Child(old.name, args, self.workdir)
        self.children[index].wait_ready()

    def _start(self, name: str, args: list[str]) -> Child:
        child = Child(name, args, self.workdir)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise a clear error naming any child that has crashed."""
        for child in self.children:
            child.check()

    def watch(self, interval_s: float = 0.5) -> threading.Event:
        """Interrupt the main thread as soon as a child dies; returns the event that records it.

        Without this a crashed child would only surface when a request times out. A real
        SIGINT, unlike ``_thread.interrupt_main``, also wakes a thread blocked in ZeroMQ.
        """
        died = threading.Event()

        def poll() -> None:
            while not died.is_set() and not self._stopping:
                if any(c.process.poll() is not None for c in self.children):
                    died.set()
                    os.kill(os.getpid(), signal.SIGINT)
                time.sleep(interval_s)

        threading.Thread(target=poll, daemon=True, name="cluster-watch").start()
        return died

    def stop(self) -> None:
        """Stop both children; remove a temporary working directory unless a child crashed (its logs stay)."""
        self._stopping = True
        crashed = any(c.process.poll() not in (None, 0) for c in self.children)
        for child in reversed(self.children):
            child.stop()
        if self._owns_workdir and not crashed:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()
