"""Transfer progress (bytes, MB/s) shared by worker threads: a live line on a terminal, periodic log lines
otherwise; and a bandwidth limiter."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

MB = 1_000_000


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else 0.0


class TransferProgress:
    """Thread-safe byte counter. ``live=True`` redraws one line on ``stream`` (a terminal) twice a second;
    otherwise it logs a line every ``log_every`` seconds."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, live: bool | None = None,
                 log_every: float = 10.0, logger: logging.Logger | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self._stream = stream or sys.stderr
        self._live = self._stream.isatty() if live is None else live
        self._log_every = log_every
        self._logger = logger or logging.getLogger("engine.progress")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TransferProgress:
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._live:
            self._stream.write("\r" + self.line() + "\n")
            self._stream.flush()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done / MB:,.1f}/{self.total / MB:,.1f} MB ({pct:5.1f}%) "
                f"{mb_per_s(self.done, elapsed):,.1f} MB/s")

    def _loop(self) -> None:
        interval = 0.5 if self._live else self._log_every
        while not self._stop.wait(interval):
            if self._live:
                self._stream.write("\r" + self.line() + "  ")
                self._stream.flush()
            else:
                self._logger.info(self.line())


class RateLimiter:
    """Caps the total bytes/s of all threads together (``None`` or 0: unlimited)."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.rate = bytes_per_s or 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)
