"""Entry point of the enclave process (``python -m tee``), also the Gramine manifest's entrypoint.

Deliberately stdlib-only on top of the enclave's own dependencies: ``heclave
enclave`` replaces itself with this program, so the enclave's measured code is
no larger than it must be.

The socket is a CURVE server with a key pair of its own (sealed in the state
directory, so a restart keeps the key the server pinned), and with
``--allow-clients`` it completes a handshake only with the listed client keys:
in practice the server's. That list comes from the host, even under Gramine
(a file the host writes), so it keeps *other* processes on the host off the
enclave's socket, not the operator, who runs the server and holds its key.
Nothing the enclave guarantees depends on it: every request is checked as if
the operator had sent it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from protocol.curve import AllowedKeys, CurveKeys
from protocol.errors import HeclaveError
from protocol.evidence import Runtime
from protocol.storage import write_atomic
from protocol.transport import router, serve, stop_requested, write_public_key

from .enclave import Enclave
from .runtime import detect
from .sealing import seal, sealing_key, unseal

log = logging.getLogger("heclave.enclave")

CURVE_FILE = "enclave-curve.sealed"


def curve_keys(state_dir: Path | None) -> CurveKeys:
    """The socket's CURVE key pair: sealed in ``state_dir`` and kept across restarts, else in memory only."""
    if state_dir is None:
        return CurveKeys.generate()
    path, key = state_dir / CURVE_FILE, sealing_key(state_dir)
    if path.exists():
        return CurveKeys.from_secret(unseal(key, "curve", path.read_bytes(), path)["secret"], str(path))
    keys = CurveKeys.generate()
    write_atomic(path, seal(key, "curve", {"secret": keys.secret}))
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heclave enclave", description=__doc__)
    parser.add_argument("--bind", default="tcp://127.0.0.1:5556", help="loopback endpoint the server connects to")
    parser.add_argument("--ready-file", type=Path, help="write {endpoint, runtime, public_key} here once serving")
    parser.add_argument(
        "--key-file", type=Path, help="write the socket's CURVE public key here (for the server's --enclave-key)"
    )
    parser.add_argument(
        "--allow-clients",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="accept only the CURVE client keys listed in FILE (one Z85 key per line, # comments; the server's "
        "public key file is such a list), re-read when it changes; repeatable. Without it any process on this "
        "host that speaks CURVE can connect",
    )
    parser.add_argument("--runtime", choices=[r.value for r in Runtime], help="refuse to start unless detected")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="keep the key set, identity key and registered models sealed here, so a restart keeps them "
        "(without it the keys live only as long as the process)",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when the process that started this one exits (a supervising server that was killed)",
    )
    parser.add_argument(
        "--insecure-skip-verification",
        action="store_true",
        help="INSECURE, for measuring what verification costs only (heclave bench cnn): do not check the "
        "server's layer results, which makes the enclave a decryption oracle for the server",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s enclave %(levelname)s %(message)s", stream=sys.stderr)

    detected = detect()
    if args.runtime and Runtime(args.runtime) is not detected:
        log.error("expected runtime %s but this process runs as %s", args.runtime, detected.value)
        return 2
    enclave = Enclave(
        runtime=detected, state_dir=args.state_dir, insecure_skip_verification=args.insecure_skip_verification
    )
    try:
        keys = curve_keys(args.state_dir)
        allow = AllowedKeys(args.allow_clients) if args.allow_clients else None
    except HeclaveError as exc:
        log.error("%s", exc.message)
        return 2
    if allow is None:
        log.warning("no --allow-clients: any process on this host that speaks CURVE can connect")
    sock, endpoint = router(args.bind, curve=keys, allow=allow)
    should_stop = stop_requested(args.exit_with_parent)
    if args.key_file:
        write_public_key(args.key_file, keys.public)
    if args.ready_file:
        ready = {"endpoint": endpoint, "runtime": detected.value, "public_key": keys.public.decode()}
        write_atomic(args.ready_file, json.dumps(ready).encode())
    log.info("serving on %s (runtime %s), CURVE public key %s", endpoint, detected.value, keys.public.decode())
    serve(sock, enclave.handle, should_stop, enclave.idle)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
