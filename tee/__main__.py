"""Entry point of the enclave process (``python -m heclave.tee``), also the Gramine manifest's entrypoint.

Deliberately stdlib-only on top of the enclave's own dependencies: ``heclave
enclave`` replaces itself with this program, so the enclave's measured code is
no larger than it must be.

With ``--link-token FILE`` the socket completes a handshake only with a client
presenting the token in FILE (made there on first start): in practice the
server, which reads the same file (``protocol.link``: authenticated, not
encrypted, because nothing on the link is secret from the server). The file
lives on the host, even under Gramine, so the token keeps *other* processes on
the host off the enclave's socket, not the operator, who runs the server.
Nothing the enclave guarantees depends on it: every request is checked as if
the operator had sent it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from heclave.protocol import link, service
from heclave.protocol.errors import HeclaveError
from heclave.protocol.evidence import Runtime
from heclave.protocol.transport import router, serve

from .enclave import Enclave
from .runtime import detect

log = logging.getLogger("heclave.enclave")

OPTIONS = service.options("tcp://127.0.0.1:5556", "Loopback endpoint the server connects to.", "{endpoint, runtime}")


def main(argv: list[str] | None = None) -> int:
    parser = service.parser("heclave enclave", __doc__, OPTIONS)
    parser.add_argument(
        "--link-token",
        type=Path,
        metavar="FILE",
        help="admit only clients presenting the token in FILE, made there (owner-only) if missing; the server "
        "reads it with --enclave-token. Without it any process on this host can connect",
    )
    parser.add_argument("--runtime", choices=[r.value for r in Runtime], help="refuse to start unless detected")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="keep the key set, identity key and registered models sealed here, so a restart keeps them "
        "(without it the keys live only as long as the process)",
    )
    parser.add_argument(
        "--insecure-skip-verification",
        action="store_true",
        help="INSECURE, for measuring what verification costs only (heclave bench cnn): do not check the "
        "server's layer results, which makes the enclave a decryption oracle for the server",
    )
    args = parser.parse_args(argv)
    service.configure_logging(label="enclave")

    detected = detect()
    if args.runtime and Runtime(args.runtime) is not detected:
        log.error("expected runtime %s but this process runs as %s", args.runtime, detected.value)
        return 2
    enclave = Enclave(
        runtime=detected, state_dir=args.state_dir, insecure_skip_verification=args.insecure_skip_verification
    )
    try:
        token = link.load_or_create(args.link_token) if args.link_token else None
    except (HeclaveError, OSError) as exc:
        log.error("cannot use the link token %s: %s", args.link_token, getattr(exc, "message", exc))
        return 2
    if token is None:
        log.warning("no --link-token: any process on this host can connect to the enclave's socket")
    sock, endpoint = router(args.bind, link_token=token)
    should_stop = service.stop_requested(args.exit_with_parent)
    service.write_ready(args.ready_file, endpoint=endpoint, runtime=detected.value)
    log.info("serving on %s (runtime %s)", endpoint, detected.value)
    serve(sock, enclave.handle, should_stop, enclave.idle)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
