"""Per-replica fault accounting: a circuit breaker and passive outlier ejection.

Both count only *upstream* faults: a refused or broken connection, a 5xx, a timeout. A client's 4xx is the
replica working correctly and counts as a success, so a storm of bad requests can never take a fleet out.

Circuit breaker: ``failures`` consecutive faults open it; while open the replica gets no traffic. When the
open period ends the breaker is half-open: exactly one trial request goes through; its success closes the
breaker, its failure re-opens it for twice as long (up to ``max_open``).

Outlier ejection: a window of the last attempts' outcomes; a fault ratio at or above ``ratio`` (once enough
attempts were seen) ejects the replica for a while, growing with each ejection. This catches a replica that
fails often but not consecutively (which the breaker would miss). The pool caps how many are ejected at once.
"""

from __future__ import annotations

from collections import deque

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    __slots__ = (
        "failures",
        "base_open",
        "max_open",
        "state",
        "consecutive",
        "open_until",
        "open_for",
        "trial",
        "opened_count",
    )

    def __init__(self, failures: int = 5, open_seconds: float = 5.0, max_open: float = 60.0) -> None:
        self.failures = failures
        self.base_open = open_seconds
        self.max_open = max_open
        self.state = CLOSED
        self.consecutive = 0
        self.open_until = 0.0
        self.open_for = open_seconds
        self.trial = False  # a half-open trial request is in flight
        self.opened_count = 0

    def allows(self, now: float) -> bool:
        """May a request go to this replica now? (Pure: does not take the half-open trial slot.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return now >= self.open_until
        return not self.trial

    def acquire(self, now: float) -> None:
        """The router sent a request here: in the half-open state that request is the trial."""
        if self.state == OPEN and now >= self.open_until:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            self.trial = True

    def release(self) -> None:
        """An attempt ended with neither a fault nor a success (the client left): free the trial slot."""
        self.trial = False

    def record_success(self) -> None:
        self.consecutive = 0
        self.trial = False
        if self.state != CLOSED:
            self.state = CLOSED
            self.open_for = self.base_open

    def record_failure(self, now: float) -> bool:
        """Count an upstream fault; True when this fault opened (or re-opened) the breaker."""
        self.consecutive += 1
        self.trial = False
        if self.state == HALF_OPEN or (self.state == OPEN and now >= self.open_until):
            self.open_for = min(self.open_for * 2, self.max_open)
            self._open(now)
            return True
        if self.state == CLOSED and self.consecutive >= self.failures:
            self.open_for = self.base_open
            self._open(now)
            return True
        return False

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.open_until = now + self.open_for
        self.opened_count += 1


class OutlierDetector:
    """Fault ratio over the last ``window`` attempts of one replica."""

    __slots__ = (
        "window",
        "min_requests",
        "ratio",
        "base_eject",
        "max_eject",
        "outcomes",
        "faults",
        "ejected_until",
        "ejections",
    )

    def __init__(
        self,
        window: int = 20,
        min_requests: int = 10,
        ratio: float = 0.5,
        eject: float = 10.0,
        max_eject: float = 60.0,
    ) -> None:
        self.window = window
        self.min_requests = min(min_requests, window)
        self.ratio = ratio
        self.base_eject = eject
        self.max_eject = max_eject
        self.outcomes: deque[bool] = deque(maxlen=window)  # True = fault
        self.faults = 0
        self.ejected_until = 0.0
        self.ejections = 0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def record(self, fault: bool) -> None:
        if len(self.outcomes) == self.window and self.outcomes[0]:
            self.faults -= 1
        self.outcomes.append(fault)
        if fault:
            self.faults += 1

    def should_eject(self, now: float) -> bool:
        n = len(self.outcomes)
        return not self.ejected(now) and n >= self.min_requests and self.faults >= self.ratio * n

    def eject(self, now: float) -> None:
        self.ejections += 1
        self.ejected_until = now + min(self.base_eject * self.ejections, self.max_eject)
        # Start afresh after the ejection: the replica is judged on what it does when it comes back.
        self.outcomes.clear()
        self.faults = 0
