"""Entry point of the enclave process (``python -m tee``), also the Gramine manifest's entrypoint.

Deliberately stdlib-only on top of the enclave's own dependencies: ``heclave
enclave`` replaces itself with this program, so the enclave's measured code is
no larger than it must be.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from protocol.evidence import Runtime
from protocol.transport import router, serve, stop_requested

from .enclave import Enclave
from .runtime import detect

log = logging.getLogger("heclave.enclave")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heclave enclave", description=__doc__)
    parser.add_argument("--bind", default="tcp://127.0.0.1:5556", help="loopback endpoint the server connects to")
    parser.add_argument("--ready-file", type=Path, help="write {endpoint, runtime} here once serving")
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
    sock, endpoint = router(args.bind)
    should_stop = stop_requested(args.exit_with_parent)
    if args.ready_file:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"endpoint": endpoint, "runtime": detected.value}))
        tmp.replace(args.ready_file)
    log.info("serving on %s (runtime %s)", endpoint, detected.value)
    serve(sock, enclave.handle, should_stop, enclave.idle)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
