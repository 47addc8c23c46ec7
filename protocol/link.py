"""The server–enclave link: authenticated by a shared token, deliberately not encrypted.

Everything on this link is either the server's own to see (ciphertexts, graphs,
public contexts, the activations of ``plain`` layers) or sealed end to end
between an owner and the enclave (session envelopes), so encrypting it again
protects nothing, and it costs: CURVE moves about 145 MB/s on this project's
machine, which made the demo's per-image latency 24% longer (34 to 42 ms). What
the link does need is that no other process on the host can reach the enclave's
socket. That is ZeroMQ's PLAIN mechanism, vetted by pyzmq's ZAP handler against
a random token the enclave keeps in an owner-only file and the server reads.
PLAIN carries the token in the clear over loopback, which only root can read,
and root is the operator, whom this never kept out: nothing the enclave
guarantees rests on who reaches its socket.
"""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path

import zmq

from .curve import zap_handler
from .errors import ErrorCode, ProtocolError
from .storage import write_atomic

USER = b"heclave-server"
_domains = itertools.count()


def load_or_create(path: Path) -> bytes:
    """The token in ``path``, made there (owner-only) on first use, so a restart keeps what the server read."""
    if not path.exists():
        write_atomic(path, secrets.token_hex(32).encode())
    return read(path)


def read(path: Path) -> bytes:
    """The token an enclave wrote to ``path``, or an error saying what to pass."""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ProtocolError(
            f"Cannot read the enclave's link token {path} ({exc.strerror}); pass the file the enclave's "
            "--link-token wrote.",
            ErrorCode.BAD_FIELD,
        ) from None
    if len(token) != 64:
        raise ProtocolError(f"{path} does not hold an enclave link token (64 characters).", ErrorCode.BAD_FIELD)
    return token


def guard(sock: zmq.Socket, token: bytes) -> None:
    """Make ``sock`` (not bound yet) complete a handshake only with a client presenting ``token``."""
    domain = f"heclave-link-{next(_domains)}"
    zap_handler(sock.context).configure_plain(domain, {USER.decode(): token.decode()})
    sock.zap_domain = domain.encode()
    sock.plain_server = True


def present(sock: zmq.Socket, token: bytes) -> None:
    """Make ``sock`` (not connected yet) present ``token`` at the handshake."""
    sock.plain_username = USER
    sock.plain_password = token
