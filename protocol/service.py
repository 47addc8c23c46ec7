"""What every long-running heclave process shares: its common options, its logging, how it learns to stop,
and the ready file that tells whoever started it that it serves.

The enclave (``python -m heclave.tee``), the server (``heclave server``) and the HE worker
(``python -m heclave.parties.worker``) each bind a socket and serve until a signal stops them, and
another process often starts them (``parties.processes.Child``) and waits for their ready file. The
standard library only, besides ``protocol.storage``: the enclave imports this module, and its measured
code must not grow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .storage import write_atomic


@dataclass(frozen=True)
class Option:
    """One command-line option of a long-running process, declared once for argparse (the enclave and the
    worker, which stay free of click) and for click (the server, a ``heclave`` subcommand)."""

    flag: str
    help: str
    default: str | None = None
    path: bool = False
    switch: bool = False


def options(bind: str, bind_help: str, ready_fields: str, exit_with_parent: bool = True) -> tuple[Option, ...]:
    """The options every long-running process takes: the endpoint it binds (``bind`` by default), the file
    that announces ``ready_fields`` once it serves and, for a process a supervisor starts as its child,
    whether to stop with that parent."""
    common = (
        Option("--bind", bind_help, default=bind),
        Option("--ready-file", f"Write {ready_fields} here (atomically) once serving.", path=True),
    )
    if not exit_with_parent:
        return common
    stop = Option(
        "--exit-with-parent",
        "Stop when the process that started this one exits (a server that was killed cannot stop its children).",
        switch=True,
    )
    return (*common, stop)


def parser(prog: str, description: str | None, common: Sequence[Option]) -> argparse.ArgumentParser:
    """An argument parser holding the ``common`` options; the process adds its own after them."""
    result = argparse.ArgumentParser(prog=prog, description=description)
    for option in common:
        if option.switch:
            result.add_argument(option.flag, action="store_true", help=option.help)
        else:
            kind = Path if option.path else str
            result.add_argument(option.flag, type=kind, default=option.default, help=option.help)
    return result


def configure_logging(verbose: bool = True, label: str = "%(name)s") -> None:
    """Log to stderr, each line stamped with the time and ``label`` (a process's role, or by default the
    logger's name): from INFO up when ``verbose``, warnings and errors only otherwise."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format=f"%(asctime)s {label} %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def stop_requested(exit_with_parent: bool = False) -> Callable[[], bool]:
    """Install SIGTERM and SIGINT handlers; the check returned turns true once either arrives.

    With ``exit_with_parent`` it also turns true once the process that started
    this one has exited: a child started in its own session never sees its
    parent's signals, so a server killed outright would otherwise leave its
    workers and supervised enclave serving with nobody to stop them.
    """
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    parent = os.getppid()
    return lambda: bool(stopping) or (exit_with_parent and os.getppid() != parent)


def write_ready(path: Path | None, **fields: object) -> None:
    """Announce that this process serves, and where: ``fields`` as one JSON object in ``path`` (nothing
    without a path). Written atomically, because the process that started this one polls for the file and
    must never read half of it."""
    if path is not None:
        write_atomic(path, json.dumps(fields).encode())


def read_ready(path: Path) -> dict | None:
    """What a process announced with :func:`write_ready`, or ``None`` while it has not yet."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
