"""Running the gateway: one process, or a supervisor with several worker processes on one socket.

Both run every app under ``DrainingServer`` (gateway/drain.py), so SIGTERM behaves the same with one worker
or many: each worker turns not-ready, refuses new work with 503, lets its in-flight streams finish up to
``drain_timeout``, ends the rest with an error event, then exits. With several workers the supervisor binds
the listening socket once, starts the workers (each builds its app from the same environment), forwards
the signals it gets to them, replaces a worker that dies, and exits once all workers have exited.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

import uvicorn

from gateway.drain import SHUTDOWN_GRACE, DrainingServer, catch_early_signals
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.serve")


def uvicorn_config(app: Any, settings: GatewaySettings) -> uvicorn.Config:
    """The one place uvicorn's options are written (single process and every worker alike)."""
    from gateway.http_server import uvicorn_options

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="auto",
        log_config=None,
        access_log=False,
        # The drain already waited for requests; uvicorn's own wait for connections is short.
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
        backlog=4096,
        # The request-head limits, no WebSocket upgrades, forwarded headers from trusted proxies only.
        **uvicorn_options(settings),
    )


def tune_gc(young_threshold: int) -> None:
    """Once the app is built: move every object alive now out of the cyclic collector's reach (the modules,
    settings and metric families a full collection would otherwise rescan each time) and collect the young
    generation every ``young_threshold`` allocations instead of 700. 0 leaves CPython's defaults."""
    if young_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
    log.debug("gc: froze %d objects; thresholds %s", gc.get_freeze_count(), gc.get_threshold())


# A worker's exit status when its app never started (a lifespan error): the supervisor stops then, since a new
# worker would fail the same way.
STARTUP_FAILURE = 3


def _run(
    settings: GatewaySettings, sockets: list[socket.socket] | None = None, worker_index: int = 0
) -> bool:
    """Serve until drained; False when the app never started."""
    from gateway import native
    from gateway.app import create_app

    log.info("request path: %s", native.status())
    app = create_app(settings, worker_index=worker_index)
    tune_gc(settings.gc_young_threshold)
    server = DrainingServer(uvicorn_config(app, settings), app.state.gateway, settings.drain_timeout)
    server.run(sockets=sockets)
    return server.started


def _worker(sockets: list[socket.socket], index: int) -> None:
    """A worker process: settings from the environment (the supervisor exported what the CLI was given).
    ``index`` (0..workers-1, kept by a replacement) picks this worker's share of per-replica budgets."""
    from gateway import logs

    catch_early_signals()
    settings = GatewaySettings()
    logs.configure(settings.log_level)
    if not _run(settings, sockets, index):
        sys.exit(STARTUP_FAILURE)


class Supervisor:
    """Starts ``workers`` processes on one bound socket and forwards SIGTERM/SIGINT to them."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        # fork: a worker starts with the supervisor's signal handlers (never the default one, which would
        # kill a worker that gets SIGTERM while it is still starting) and without re-importing everything.
        # The supervisor has no threads and no event loop, so forking it is safe.
        self.mp = multiprocessing.get_context("fork")
        self.sock = uvicorn_config(None, settings).bind_socket()
        self.procs: list[Any] = []
        self.stopping = False
        self.signals: list[int] = []

    def _start(self, index: int) -> Any:
        p = self.mp.Process(target=_worker, args=([self.sock], index), daemon=False)
        p.start()
        return p

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)

    def _forward_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            self.stopping = True
            log.info("signal %s: stopping %d workers", signal.Signals(sig).name, len(self.procs))
            for p in self.procs:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGTERM)

    def _replace_dead(self) -> None:
        for i, p in enumerate(self.procs):
            if not p.is_alive() and p.exitcode == STARTUP_FAILURE and not self.stopping:
                log.error("worker %s could not start its app; stopping the gateway", p.pid)
                self.signals.append(signal.SIGTERM)
                return
            if not p.is_alive() and not self.stopping:
                log.warning("worker %s exited with %s; starting a new one", p.pid, p.exitcode)
                self.procs[i] = self._start(i)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.procs = [self._start(i) for i in range(self.settings.workers)]
        log.info(
            "gateway supervisor %d: %d workers on %s:%d",
            os.getpid(),
            len(self.procs),
            self.settings.host,
            self.settings.port,
        )
        while not (self.stopping and not any(p.is_alive() for p in self.procs)):
            self._forward_signals()
            self._replace_dead()
            time.sleep(0.2)
        self.sock.close()
        return 0 if all(p.exitcode == 0 for p in self.procs) else 1


def serve(settings: GatewaySettings) -> int:
    """Serve until SIGTERM/SIGINT and a clean drain; the process's exit status."""
    if settings.workers > 1:
        return Supervisor(settings).run()
    return 0 if _run(settings) else STARTUP_FAILURE
