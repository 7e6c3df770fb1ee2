"""Graceful shutdown: on SIGTERM stop admitting, let running requests finish, then end the rest cleanly.

uvicorn's own SIGTERM handling closes the listening socket at once and, after `timeout_graceful_shutdown`, cancels
the tasks still running: a stream is cut with neither an error event nor `data: [DONE]`. `GracefulServer` puts a
drain phase in front of it: new requests (new connections included, as the socket stays open) get a 503; requests
in flight run on for up to `grace` seconds; whatever is still running then is ended by the engine loop with an error
(streams: an error event and [DONE]; others: a 503 object), and only after that does uvicorn shut down.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from lragent.server.errors import APIError

log = logging.getLogger("lragent.server")
SHUTTING_DOWN = "the server is shutting down"


@dataclass
class Admission:
    """HTTP requests inside the app, and whether new ones are still let in (event-loop side only)."""

    in_flight: int = 0
    draining: bool = False


class AdmissionMiddleware:
    """Counts requests in flight (streams until their last byte) and answers 503 to new ones while draining."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.admission.draining:
            response = APIError(503, SHUTTING_DOWN, None, "service_unavailable").response()
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        self.admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.in_flight -= 1


class GracefulServer(uvicorn.Server):
    """uvicorn.Server with a drain phase on the first SIGTERM / SIGINT (a second one exits as uvicorn does).

    `end_all()` is called once the grace period is over with requests still running; they then have `flush`
    seconds (uvicorn's `timeout_graceful_shutdown` follows) to send their final error.
    """

    def __init__(self, config: uvicorn.Config, admission: Admission, end_all: Callable[[], None], grace: float):
        super().__init__(config)
        self.admission = admission
        self.end_all = end_all
        self.grace = grace
        self.flush = max(1.0, float(config.timeout_graceful_shutdown or 5))
        self.drain_started: float | None = None
        self._announced = False
        self._ended = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal handler: flags and a queue put only (no logging, no locks); `on_tick` does the rest.

        The first signal starts the drain; the next one ends the requests in flight now (they still get their
        error event) and lets uvicorn shut down."""
        if self.drain_started is None and not self.should_exit and sig in (signal.SIGTERM, signal.SIGINT):
            self.drain_started = time.monotonic()
            self.admission.draining = True
            return
        if not self._ended:
            self._ended = True
            self.end_all()  # AsyncEngine.fail_all_nowait: a SimpleQueue.put, safe in a signal handler
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self.drain_started is not None and self._drained()

    def _drained(self) -> bool:
        """True once the drain is over: nothing in flight, or the grace period and the flush time are spent."""
        if not self._announced:
            self._announced = True
            log.info("shutting down: %d requests in flight, %.0f s to finish", self.admission.in_flight, self.grace)
        if self.admission.in_flight == 0:
            return True
        elapsed = time.monotonic() - (self.drain_started or 0.0)
        if elapsed >= self.grace and not self._ended:
            self._ended = True
            log.warning("grace period over: ending %d requests in flight", self.admission.in_flight)
            self.end_all()
        return elapsed >= self.grace + self.flush
