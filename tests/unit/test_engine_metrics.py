"""engine/metrics.py: weight-pull accounting, the GPU metric declarations, and the exporter over HTTP."""

from __future__ import annotations

import httpx

from engine import metrics as em
from tests.monitoring import scrape_names
from tests.support import free_port


def _value(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in scrape")


def test_gpu_metric_names_are_declared_by_the_nvml_collector():
    # These are the GPU-only names configs/ may use without a GPU in CI: the collector must declare them.
    declared = {f.name for f in em.GpuCollector(nvml=None).describe()}
    assert declared == set(em.GPU_METRIC_NAMES)


def test_exporter_serves_pull_metrics_and_gpu_metrics_only_with_a_gpu():
    port = free_port()
    server = em.start_exporter(port, "127.0.0.1")
    assert server is not None
    try:
        before = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        em.record_pull(1_000_000, 2.0, cache_hit=False)
        em.record_pull(0, 0.3, cache_hit=True)
        after = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        server.shutdown()
    d = lambda n, lbl="": _value(after, n, lbl) - _value(before, n, lbl)  # noqa: E731
    assert d("llm_engine_weight_pull_bytes_total") == 1_000_000
    assert d("llm_engine_weight_pulls_total", '{cache="miss"}') == 1
    assert d("llm_engine_weight_pulls_total", '{cache="hit"}') == 1
    assert d("llm_engine_weight_pull_duration_seconds_count") == 2
    assert abs(d("llm_engine_weight_pull_duration_seconds_sum") - 2.3) < 1e-9
    gpu_names = set(em.GPU_METRIC_NAMES) & scrape_names(after)
    if em.load_nvml() is None:
        assert not gpu_names  # absent, not zero, where NVML sees no GPU
    else:
        assert gpu_names == set(em.GPU_METRIC_NAMES)


def test_record_pull_never_raises_on_bad_input():
    em.record_pull(-5, float("nan"), cache_hit=True)  # type: ignore[arg-type]
    em.record_pull(10, -1.0, cache_hit=False)


def test_exporter_port_zero_is_off_and_a_taken_port_is_not_fatal():
    assert em.start_exporter(0) is None
    port = free_port()
    first = em.start_exporter(port, "127.0.0.1")
    try:
        assert em.start_exporter(port, "127.0.0.1") is None
    finally:
        first.shutdown()
