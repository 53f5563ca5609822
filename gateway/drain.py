"""Graceful drain on SIGTERM: stop being ready, finish what is in flight, then exit.

Sequence when SIGTERM (or SIGINT) arrives:
1. ``state.draining`` turns true: ``/readyz`` answers 503 and new proxied requests get a 503 with
   ``Retry-After`` (clients and load balancers retry elsewhere), while ``/healthz`` stays 200.
2. Requests already in flight (streams included) continue until none is left or ``drain_timeout``
   seconds have passed.
   Streams still running at the deadline end at their next chunk with an OpenAI-style error event
   (code ``draining``) and ``data: [DONE]``, so clients see a clean end and can retry.
3. Then uvicorn's own shutdown runs: listeners close, idle keep-alive connections close, the lifespan
   shutdown closes upstream sessions. Anything still running after a short grace is cancelled.
A second signal skips the wait (one that follows the first within ``SAME_SIGNAL_WINDOW`` seconds is taken
as the same one: a signal sent to the process group reaches a worker both directly and from its supervisor).
With several workers (gateway/serve.py) every worker drains this way.

Kubernetes ordering (see docs/operations.md): the gateway Pod gets a ``preStop`` sleep of a few seconds so
the Service stops sending to it before SIGTERM arrives; ``terminationGracePeriodSeconds`` must exceed
preStop + drain_timeout. An engine Pod is removed from the gateways' pools (its readiness fails or its DNS
record goes away) before its SIGTERM reaches vLLM, which then drains its own running requests
(``--shutdown-timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from gateway.state import GatewayState

log = logging.getLogger("gateway.drain")

# uvicorn's wait for connections after the drain: short, the drain already waited for requests.
SHUTDOWN_GRACE = 2
SAME_SIGNAL_WINDOW = 1.0


_early_signal: list[int] = []


def catch_early_signals() -> None:
    """Until the server runs, remember SIGTERM/SIGINT instead of dying; the server then drains at once."""

    def remember(sig: int, frame: FrameType | None) -> None:
        _early_signal.append(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, remember)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: GatewayState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._first_signal = 0.0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if _early_signal:
            self.handle_exit(_early_signal[0], None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not appended to uvicorn's captured signals: after a clean drain the process exits 0.
        now = time.monotonic()
        if self.state.draining and now - self._first_signal < SAME_SIGNAL_WINDOW:
            return
        if self._drain_task is not None or self.state.draining or self._loop is None:
            log.warning("second signal %s: exiting now", signal.Signals(sig).name)
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True
        self._first_signal = now
        log.info(
            "signal %s: draining %d in-flight requests (up to %.0fs)",
            signal.Signals(sig).name,
            self.state.in_flight,
            self.drain_timeout,
        )
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.state.in_flight:
            log.warning("drain deadline passed with %d requests in flight: ending them", self.state.in_flight)
            # Streams still running end at their next chunk with an OpenAI-style error event and [DONE]
            # instead of a cut connection; uvicorn cancels whatever is left after its grace.
            self.state.drain_expired = True
            end = time.monotonic() + SHUTDOWN_GRACE
            while self.state.in_flight > 0 and time.monotonic() < end:
                await asyncio.sleep(0.05)
        else:
            log.info("drained: no request in flight")
        self.should_exit = True
