"""Inference requests as the enclave tracks them, from the data owner's authorisation to the release.

A request exists only once a data owner's authorisation has opened it; it then
accepts its model's server-computed stages in graph order, each exactly once,
and ends at its release or at the first thing refused. The table is bounded
(in flight and in age, and per data-owner identity, so one identity cannot
fill it for others), abandoned requests cannot pile up, and a request is
removed on every path out of it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from heclave.protocol.channel import Session
from heclave.protocol.errors import ErrorCode, HeclaveError, QuotaError

from .verify import Expectation

MAX_IN_FLIGHT = 256
PER_IDENTITY = 32
TIMEOUT_S = 600.0


@dataclass
class Request:
    """One authorised request: whose it is, where it stands, and what the next stage must be checked against.

    ``inputs`` is the activation the enclave handed out for stage ``expected``
    (``[B, cols]``; for a ``blinded`` stage, the padded field vectors the server
    received), and ``pending`` what the enclave keeps to finish that stage (a
    blinded stage's ``W r`` and scales). ``expectation`` is what the stage's
    check needs of ``inputs``, made between messages while the server computes
    (``offline_ms`` counts it until a reply reports it), and ``bound`` the
    largest perturbation the request's checks so far could have let through
    (``tee.verify``). ``values`` holds the graph's values (``[B, size]`` each) that
    a later stage still reads: a residual block's input until its addition.
    """

    model_id: str
    request_id: str
    session: Session = field(repr=False)
    batch: int
    expected: int = 0
    inputs: np.ndarray | None = field(default=None, repr=False)
    pending: tuple | None = field(default=None, repr=False)
    expectation: Expectation | None = field(default=None, repr=False)
    offline_ms: float = 0.0
    bound: float = 0.0
    values: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    opened: float = field(default_factory=time.monotonic)


class RequestTable:
    """The requests in flight, keyed by the data owner's session and its request id."""

    def __init__(self, limit: int = MAX_IN_FLIGHT, timeout_s: float = TIMEOUT_S, per_identity: int = PER_IDENTITY):
        self._limit, self._timeout_s, self._per_identity = limit, timeout_s, per_identity
        self._requests: OrderedDict[tuple[bytes, str], Request] = OrderedDict()

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._requests.values()))

    def open(self, request: Request) -> None:
        """Track a newly authorised request; never replaces one that exists."""
        self._expire()
        key = (request.session.session_id, request.request_id)
        if key in self._requests:
            raise HeclaveError("This request is already open; a request id is used once.", ErrorCode.OUT_OF_ORDER)
        peer = request.session.peer
        if sum(1 for r in self._requests.values() if r.session.peer == peer) >= self._per_identity:
            raise QuotaError(
                f"This identity has {self._per_identity} requests in flight, its limit; wait for some to finish."
            )
        if len(self._requests) >= self._limit:
            raise HeclaveError(
                f"The enclave has {self._limit} requests in flight; retry when some have finished.", ErrorCode.BUSY
            )
        self._requests[key] = request

    def get(self, session_id: bytes, request_id: str) -> Request:
        """The open request, or an error saying that none is."""
        self._expire()
        request = self._requests.get((session_id, request_id))
        if request is None:
            raise HeclaveError(
                "No such request is open in the enclave (never authorised, finished, failed or timed out); "
                "the data owner must send it again.",
                ErrorCode.UNKNOWN_REQUEST,
            )
        return request

    def close(self, request: Request) -> None:
        """Forget a request (released, refused or failed)."""
        self._requests.pop((request.session.session_id, request.request_id), None)

    def close_model(self, model_id: str) -> None:
        """Forget every request of an undeployed model."""
        for request in self:
            if request.model_id == model_id:
                self.close(request)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._requests:
            oldest = next(iter(self._requests.values()))
            if now - oldest.opened < self._timeout_s:
                return
            self.close(oldest)
