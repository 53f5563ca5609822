"""A retry budget: retries may add at most a fixed share of the traffic.

Over a sliding window (one-second buckets), retries are allowed while
``retries < max(min_retries, ratio * requests)``. When a whole pool is failing, this keeps retries from
multiplying the load that is already hurting it (a retry storm), while a quiet pool can still fail over.
"""

from __future__ import annotations

import math
from collections import deque


class RetryBudget:
    __slots__ = ("ratio", "window", "min_retries", "_buckets", "_requests", "_retries")

    def __init__(self, ratio: float = 0.2, window: float = 10.0, min_retries: int = 10) -> None:
        self.ratio = ratio
        self.window = max(1, math.ceil(window))
        self.min_retries = min_retries
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries]
        self._requests = 0
        self._retries = 0

    def _bucket(self, now: float) -> list[int]:
        sec = int(now)
        horizon = sec - self.window
        b = self._buckets
        while b and b[0][0] <= horizon:
            old = b.popleft()
            self._requests -= old[1]
            self._retries -= old[2]
        if not b or b[-1][0] != sec:
            b.append([sec, 0, 0])
        return b[-1]

    def record_request(self, now: float) -> None:
        self._bucket(now)[1] += 1
        self._requests += 1

    def try_retry(self, now: float) -> bool:
        """Take one retry from the budget; False when the budget is spent."""
        bucket = self._bucket(now)
        if self._retries + 1 > max(self.min_retries, self.ratio * self._requests):
            return False
        bucket[2] += 1
        self._retries += 1
        return True

    @property
    def counts(self) -> tuple[int, int]:
        return self._requests, self._retries
