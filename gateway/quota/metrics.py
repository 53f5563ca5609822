"""What admission counts, as plain numbers with a typed snapshot; gateway/metrics/ names and exports them.

The counting sites read like Prometheus client calls (``stats.rejected.labels("tokens").inc()``) but hold
no registry: one collector owns every metric name. Label values are bounded (fixed reasons, the configured
backend, configured models).
"""

from __future__ import annotations

from dataclasses import dataclass


class _Cell:
    __slots__ = ("_tally", "_key")

    def __init__(self, tally: Tally, key: tuple[str, ...]) -> None:
        self._tally = tally
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        v = self._tally.values
        v[self._key] = v.get(self._key, 0.0) + amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def set(self, value: float) -> None:
        self._tally.values[self._key] = float(value)


class Tally:
    """Numbers by label values (a counter or a gauge, as the exporter declares it)."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], float] = {}

    def labels(self, *values: str) -> _Cell:
        return _Cell(self, values)


@dataclass(frozen=True, slots=True)
class QuotaSnapshot:
    # (reason,) -> requests refused by admission: requests | tokens | concurrency | request_too_large |
    # backend_unavailable | queue_full | overloaded
    rejected: dict[tuple[str, ...], float]
    # (backend, mode) -> requests decided without the shared backend; mode: open (local limits) | closed (503)
    backend_errors: dict[tuple[str, ...], float]
    # (backend,) -> settlements that could not reach it
    settle_errors: dict[tuple[str, ...], float]
    # (backend,) -> 1 while it answers, else 0
    backend_up: dict[tuple[str, ...], float]
    # (model,) -> requests waiting for an overloaded model now
    queue_depth: dict[tuple[str, ...], float]
    # (outcome,) -> requests that waited for an overloaded model; outcome: admitted | timed_out
    queued: dict[tuple[str, ...], float]


class QuotaMetrics:
    def __init__(self) -> None:
        self.rejected = Tally()
        self.backend_errors = Tally()
        self.settle_errors = Tally()
        self.backend_up = Tally()
        self.queue_depth = Tally()
        self.queued = Tally()

    def snapshot(self) -> QuotaSnapshot:
        return QuotaSnapshot(
            rejected=dict(self.rejected.values),
            backend_errors=dict(self.backend_errors.values),
            settle_errors=dict(self.settle_errors.values),
            backend_up=dict(self.backend_up.values),
            queue_depth=dict(self.queue_depth.values),
            queued=dict(self.queued.values),
        )
