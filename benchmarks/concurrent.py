"""Running several simulated data owners at once, and timing the whole."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_clients(clients: int, body: Callable[[int], None]) -> float:
    """Run ``body(c)`` for every client ``c`` in its own thread; returns the wall-clock seconds taken."""
    threads = [threading.Thread(target=body, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started
