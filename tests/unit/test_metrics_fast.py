"""The lock-free per-request metric families export exactly what prometheus_client's own would."""

from __future__ import annotations

import random
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics.fast import FastCounter, FastHistogram

BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1, 10)


def _text(registry: CollectorRegistry) -> str:
    # _created holds the time each series was made: the only value allowed to differ.
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", generate_latest(registry).decode())


@pytest.mark.parametrize("seed", range(4))
def test_same_exposition_as_prometheus_client(seed):
    rng = random.Random(seed)
    ours, ref = CollectorRegistry(), CollectorRegistry()
    oc = FastCounter("x_requests", "Requests", ["model", "route"], registry=ours)
    rc = Counter("x_requests", "Requests", ["model", "route"], registry=ref)
    oh = FastHistogram("x_latency_seconds", "Latency", ["route"], buckets=BUCKETS, registry=ours)
    rh = Histogram("x_latency_seconds", "Latency", ["route"], buckets=BUCKETS, registry=ref)
    for _ in range(500):
        model, route = rng.choice(["a", "b"]), rng.choice(["chat", "embeddings", "c"])
        n = rng.choice([1, 1, 3, 0.5])
        oc.labels(model, route).inc(n)
        rc.labels(model, route).inc(n)
        # values on bucket edges too: "le" means less than or equal
        v = rng.choice([rng.random() * 20, rng.choice(BUCKETS), 0.0])
        oh.labels(route).observe(v)
        rh.labels(route).observe(v)
    assert _text(ours) == _text(ref)
    assert 'x_latency_seconds_bucket{le="+Inf",route="chat"}' in _text(ours)


def test_label_count_and_negative_increments_are_refused():
    c = FastCounter("y", "Y", ["a"], registry=None)
    with pytest.raises(ValueError):
        c.labels("1", "2")
    with pytest.raises(ValueError):
        c.labels("1").inc(-1)
    # a non-string label value is the same series as its text
    c.labels(1).inc()
    c.labels("1").inc()
    assert c.labels("1").value == 2
