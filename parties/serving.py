"""The server process: a responsive front loop, a bounded queue, and one worker doing the HE work.

The front loop owns the parties' ROUTER socket. It answers malformed messages
at once and queues the rest; when the queue is full it answers ``busy`` at once,
so a burst costs bounded memory and every client hears back instead of timing
out. The worker thread owns the connection to the enclave and evaluates one
request at a time (SEAL holds the GIL, so more threads would not add speed);
its replies return to the front loop through an in-process socket, because a
ZeroMQ socket belongs to one thread. A request that waited in the queue longer
than its deadline is answered ``busy`` instead of being run for nobody.

The parties' socket is CURVE with the server's key pair (kept in the state
directory), whose public key parties pin; with ``allow_clients`` it completes
a handshake only with the listed client keys, without, it is open to any key.
The link to the enclave presents the enclave's link token (``protocol.link``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq

from heclave.protocol import link, service
from heclave.protocol.curve import AllowedKeys, CurveKeys
from heclave.protocol.errors import ErrorCode, HeclaveError
from heclave.protocol.messages import Message, decode, encode, error_message, try_parse_id
from heclave.protocol.transport import Received, handle_frames, receive, router, write_public_key

from .bundles import BundleStore
from .executors import Executor, InlineExecutor, ProcessExecutor
from .processes import SERVER_CURVE_SECRET, EnclaveSupervisor
from .server import Server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """How to run the server process."""

    bind: str
    enclave: str
    key_file: Path
    state_dir: Path | None = None
    ready_file: Path | None = None
    enclave_timeout_s: float = 60.0
    max_queue: int = 32
    queue_timeout_s: float = 60.0
    spawn_enclave: bool = False
    workers: int | None = None
    ray: str | None = None
    enclave_token: Path | None = None
    allow_clients: tuple[Path, ...] = ()


def curve_keys(state_dir: Path | None) -> CurveKeys:
    """The server's transport identity: kept in the state directory so pinned and allowed keys survive restarts."""
    if state_dir is None:
        return CurveKeys.generate()
    return CurveKeys.load_or_create(state_dir / SERVER_CURVE_SECRET)


@dataclass
class _Job:
    identity: bytes
    request: Message
    queued_at: float
    client: str


class _Lane(threading.Thread):
    """Takes queued requests, runs them through the server on its lane, and hands the replies back."""

    def __init__(
        self,
        lane: int,
        server: Server,
        jobs: queue.Queue,
        reply_endpoint: str,
        context: zmq.Context,
        queue_timeout_s: float,
    ) -> None:
        super().__init__(name=f"lane-{lane}", daemon=True)
        self.lane, self.server, self.jobs, self.queue_timeout_s = lane, server, jobs, queue_timeout_s
        self.replies = context.socket(zmq.PUSH)
        self.replies.connect(reply_endpoint)

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                break
            if time.monotonic() - job.queued_at > self.queue_timeout_s:
                busy = HeclaveError(
                    "The server is busy: the request waited too long in its queue; retry later.", ErrorCode.BUSY
                )
                frames = encode(error_message(busy, job.request.id))
            else:
                handler = functools.partial(self.server.handle, lane=self.lane, client=job.client)
                frames = handle_frames(encode(job.request), handler)
            self.replies.send_multipart([job.identity, *frames])
        self.replies.close(linger=0)


def make_executor(config: ServerConfig, workdir: Path) -> Executor:
    """The configured executor: Ray, local worker processes, or the server process itself (0 workers)."""
    if config.ray:
        from .ray_executor import RayExecutor

        return RayExecutor(config.workers or os.cpu_count() or 1, config.ray)
    if config.workers == 0:
        return InlineExecutor()
    return ProcessExecutor(config.workers or os.cpu_count() or 1, workdir)


def run_server(config: ServerConfig, should_stop: Callable[[], bool]) -> None:
    """Serve parties until ``should_stop`` returns true."""
    state = config.state_dir or Path(tempfile.mkdtemp(prefix="heclave-server-"))
    keys = curve_keys(config.state_dir)
    supervisor = None
    if config.spawn_enclave:
        supervisor = EnclaveSupervisor(state / "enclave-run", state / "enclave-state")
        token = link.read(supervisor.token_file)
        config = dataclasses.replace(config, enclave=supervisor.endpoint)
        log.info("supervising the enclave (pid %d) on %s", supervisor.pid(), supervisor.endpoint)
    elif config.enclave_token is not None:
        token = link.read(config.enclave_token)
    else:
        raise HeclaveError(
            "The enclave admits only the server: give the token file its --link-token wrote with "
            "--enclave-token FILE, or let the server run it with --spawn-enclave.",
            ErrorCode.BAD_FIELD,
        )
    executor = make_executor(config, state / "workers")
    try:
        status = {"lanes": executor.lanes, **({"enclave_pid": supervisor.pid()} if supervisor else {})}
        if isinstance(executor, ProcessExecutor):
            status["worker_pids"] = executor.pids()
        _serve(config, keys, token, executor, should_stop, status)
    finally:
        executor.close()
        if supervisor is not None:
            supervisor.stop()


def _serve(
    config: ServerConfig,
    keys: CurveKeys,
    token: bytes,
    executor: Executor,
    should_stop: Callable[[], bool],
    status: dict,
) -> None:
    context = zmq.Context.instance()
    allow = AllowedKeys(config.allow_clients) if config.allow_clients else None
    sock, endpoint = router(config.bind, curve=keys, context=context, allow=allow)
    if allow is None:
        log.warning("open to any client key (no --allow-clients): anyone who can reach %s may connect", endpoint)
    write_public_key(config.key_file, keys.public)
    store = BundleStore(config.state_dir / "models") if config.state_dir else None
    server = Server(config.enclave, executor, store, config.enclave_timeout_s, token)
    restored = server.restore()
    if restored:
        log.info("serving %d model(s) restored from disk", restored)
    jobs: queue.Queue = queue.Queue(maxsize=config.max_queue)
    replies = context.socket(zmq.PULL)
    reply_endpoint = f"inproc://heclave-replies-{id(replies)}"
    replies.bind(reply_endpoint)
    lanes = [_Lane(i, server, jobs, reply_endpoint, context, config.queue_timeout_s) for i in range(executor.lanes)]
    for lane in lanes:
        lane.start()
    service.write_ready(config.ready_file, endpoint=endpoint, public_key=keys.public.decode(), **status)
    log.info("listening on %s with %d lane(s); CURVE public key written to %s", endpoint, len(lanes), config.key_file)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(replies, zmq.POLLIN)
    try:
        while not should_stop():
            for ready, _ in poller.poll(200):
                if ready is replies:
                    identity, *frames = replies.recv_multipart()
                    sock.send_multipart([identity, *frames], copy=False)
                else:
                    got = receive(sock)
                    reply = got.refusal or _admit(got, jobs)
                    if reply is not None:
                        sock.send_multipart([got.routing, *reply], copy=False)
    finally:
        for _ in lanes:
            jobs.put(None)
        for lane in lanes:
            lane.join(timeout=5)
        replies.close(linger=0)
        sock.close(linger=0)


def _admit(got: Received, jobs: queue.Queue) -> list[bytes] | None:
    """Queue a well-formed request; return an immediate error reply for anything else."""
    frames = got.frames
    try:
        request = decode(frames)
        jobs.put_nowait(_Job(got.routing, request, time.monotonic(), got.client))
        return None
    except HeclaveError as exc:
        return encode(error_message(exc, try_parse_id(frames)))
    except queue.Full:
        busy = HeclaveError(f"The server is busy ({jobs.maxsize} requests queued); retry in a moment.", ErrorCode.BUSY)
        return encode(error_message(busy, try_parse_id(frames)))
