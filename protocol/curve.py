"""Who may connect over CURVE: key pairs, allow lists of client keys, and pyzmq's ZAP handler.

CURVE alone only encrypts: a CURVE server completes a handshake with any
client key. Every CURVE ROUTER of ``protocol.transport`` therefore has its
clients vetted at the handshake by pyzmq's ZAP handler (``zmq.auth``), against
an :class:`AllowedKeys` list or accepting any key; either way ZAP stamps each
message with the key its sender connected with (:func:`client_key`), so a
handler can tell clients apart.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .errors import ErrorCode, HeclaveError, ProtocolError
from .storage import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE key pair in Z85 text form, as ZeroMQ expects it."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, secret: bytes, origin: str = "the secret key") -> CurveKeys:
        """The pair of a Z85 secret key; ``origin`` names where it came from in the error."""
        secret = secret.strip()
        try:
            return cls(zmq.curve_public(secret), secret)
        except (ValueError, zmq.ZMQError):
            raise ProtocolError(
                f"{origin} is not a 40-character Z85 CURVE secret key; move it aside to make a new one.",
                ErrorCode.BAD_FIELD,
            ) from None

    @classmethod
    def load_or_create(cls, path: Path) -> CurveKeys:
        """A persistent pair: the secret key in ``path`` (owner-only), made there on first use.

        Whoever pinned or allow-listed the public key keeps accepting this
        process after a restart.
        """
        if path.exists():
            return cls.from_secret(path.read_bytes(), str(path))
        keys = cls.generate()
        write_atomic(path, keys.secret)
        return keys


_Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
_REFUSALS_LOGGED = 1024


class AllowedKeys:
    """The CURVE client keys a ROUTER accepts, listed in files and re-read whenever one changes.

    A file holds one Z85 public key per line, optionally followed by a
    ``# comment``; other lines starting with ``#``, and blank lines, are
    ignored. So a public key file (``protocol.transport.write_public_key``) is a
    list of one. A file that does not exist (yet) lists no key; one with a line
    that is neither is refused at start, and when it changes later the previous
    keys stay in force (logged), because a typo must neither lock everyone out
    nor let anyone in. Checking the files costs one ``stat`` each per handshake,
    so an edit takes effect at the next connection, without a signal.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        self._seen: tuple | None = None
        self._keys: frozenset[bytes] = frozenset()
        self._refused: set[bytes] = set()
        self._lock = threading.Lock()
        self._reload(strict=True)

    @property
    def keys(self) -> frozenset[bytes]:
        """The keys in force, after re-reading the files if they changed."""
        with self._lock:
            self._reload(strict=False)
            return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: whether the Z85 ``key`` may finish its handshake.

        It runs on the ZAP thread, where an exception would stop every later
        handshake, so nothing escapes it.
        """
        try:
            allowed = key in self.keys
        except Exception as exc:
            log.error("could not check a client key against %s (%s); refusing it", self._names(), type(exc).__name__)
            return False
        if not allowed and key not in self._refused:
            if len(self._refused) >= _REFUSALS_LOGGED:
                self._refused.clear()
            self._refused.add(key)
            log.warning("refused a client whose CURVE key %s is not listed in %s", key.decode(), self._names())
        return allowed

    def _names(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def _reload(self, strict: bool) -> None:
        status = tuple(self._status(path) for path in self.paths)
        if status == self._seen:
            return
        try:
            keys = frozenset(key for path in self.paths for key in self._read(path))
        except HeclaveError as exc:
            if strict:
                raise
            log.error("kept the previous %d allowed key(s): %s", len(self._keys), exc.message)
        else:
            self._keys = keys
            log.info("%d client key(s) allowed by %s", len(keys), self._names())
            for path in self.paths:
                if not path.exists():
                    log.warning("%s does not exist yet: no key is allowed from it until it does", path)
        self._seen = status

    @staticmethod
    def _status(path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    @staticmethod
    def _read(path: Path) -> list[bytes]:
        if not path.exists():
            return []
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ProtocolError(f"Cannot read the allow list {path}: {exc.strerror}.", ErrorCode.BAD_FIELD) from None
        keys = []
        for number, line in enumerate(text.splitlines(), 1):
            # '#' is also a Z85 digit: a line is a key when its first word is one, else a comment.
            key, *rest = line.split(None, 1) or [b""]
            if len(key) == 40 and _Z85.issuperset(key) and (not rest or rest[0].startswith(b"#")):
                keys.append(key)
            elif key and not key.startswith(b"#"):
                raise ProtocolError(
                    f"{path}, line {number}, is not a 40-character Z85 CURVE public key; "
                    "list one key per line (# starts a comment).",
                    ErrorCode.BAD_FIELD,
                )
        return keys


class _AnyKey:
    """The credentials provider of a CURVE socket without an allow list: every key may connect."""

    @staticmethod
    def callback(domain: str, key: bytes) -> bool:
        return True


_zap_lock = threading.Lock()
_authenticators: dict[zmq.Context, ThreadAuthenticator] = {}
_domains = itertools.count()


def vet_clients(sock: zmq.Socket, allow: AllowedKeys | None) -> None:
    """Have the ZAP handler of ``sock``'s context vet its CURVE clients: only ``allow``, or any key.

    Call it before the socket binds, so that no client ever skips the check.
    """
    domain = f"heclave-{next(_domains)}"
    zap_handler(sock.context).configure_curve_callback(domain, allow or _AnyKey())
    sock.zap_domain = domain.encode()


def zap_handler(context: zmq.Context) -> ThreadAuthenticator:
    """The context's ZAP handler, started on first use: libzmq allows one per context, so sockets share
    it and each gets a ZAP domain of its own."""
    with _zap_lock:
        if context not in _authenticators:
            auth = ThreadAuthenticator(context)
            auth.start()
            _authenticators[context] = auth
        return _authenticators[context]


def client_key(frame: zmq.Frame) -> str:
    """The Z85 CURVE public key the sender of ``frame`` connected with, as the ZAP handler accepted it.

    ``frame`` is any frame of a message received with ``copy=False`` (bytes
    carry no metadata); it is empty for a socket of :func:`router` without CURVE.
    """
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return ""
