"""The engine process's own Prometheus exporter (``ENGINE_METRICS_PORT``, default 9400).

vLLM's metrics stay on vLLM's port (``/metrics``); this exporter adds what vLLM does not know:

* GPU utilization and memory per GPU through NVML (``nvidia-ml-py``, in the ``engine-gpu`` extra). On a
  machine without an NVIDIA GPU or without the library these series are absent, never zero.
* Weight pulls: bytes, duration, cache hits, an unreachable source. ``engine/weights.py`` reports each pull by calling
  :func:`record_pull`::

      from engine.metrics import record_pull
      record_pull(bytes_downloaded, seconds, cache_hit=False)

  :func:`record_source` sets ``llm_engine_weights_source_unreachable{source}`` to 1 when a pull had to start
  from the local verified copy because S3 could not be reached (0 when the source answered).

  They are cheap, thread safe, never raise, and work whether or not the exporter was started (pulls that
  happen before ``start_exporter`` are reported once it runs, as it is the same process).

The metrics live on this module's own registry (``REGISTRY``), not prometheus_client's global one.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("engine.metrics")

# Metric names exported only where NVML sees a GPU (tests check they are declared here; see
# GpuCollector.describe). Keep in sync with configs/ (dashboard, alerts).
GPU_METRIC_NAMES = (
    "llm_engine_gpu_utilization_ratio",
    "llm_engine_gpu_memory_used_bytes",
    "llm_engine_gpu_memory_total_bytes",
)
GPU_LABELS = ["gpu", "uuid", "name"]

# A pull may take a second (cache hit: verify only) or an hour (a 400 GB checkpoint).
PULL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

REGISTRY = CollectorRegistry()
_lock = threading.Lock()

PULL_BYTES = Counter(
    "llm_engine_weight_pull_bytes", "Bytes downloaded from object storage for model weights", registry=REGISTRY
)
PULL_DURATION = Histogram(
    "llm_engine_weight_pull_duration_seconds", "Wall time of one weight pull (download and verify)",
    buckets=PULL_BUCKETS, registry=REGISTRY,
)
PULLS = Counter(
    "llm_engine_weight_pulls", "Weight pulls by cache outcome (hit: already verified locally)", ["cache"],
    registry=REGISTRY,
)
for _c in ("hit", "miss"):
    PULLS.labels(_c)


SOURCE_UNREACHABLE = Gauge(
    "llm_engine_weights_source_unreachable",
    "1 while the weights in use were taken from the local verified cache because their S3 source could not be "
    "reached when they were pulled; 0 once the source answered",
    ["source"], registry=REGISTRY,
)


def record_source(uri: str, reachable: bool) -> None:
    """Report whether the S3 source of a pull answered (called by engine/weights.py). Never raises."""
    try:
        SOURCE_UNREACHABLE.labels(uri).set(0 if reachable else 1)
    except Exception:
        log.exception("record_source failed")


def record_pull(bytes: int, seconds: float, cache_hit: bool) -> None:  # noqa: A002 - the agreed signature
    """Report one weight pull (called by engine/weights.py). Never raises."""
    try:
        with _lock:
            if bytes and bytes > 0:
                PULL_BYTES.inc(bytes)
            PULL_DURATION.observe(max(0.0, float(seconds)))
            PULLS.labels("hit" if cache_hit else "miss").inc()
    except Exception:  # metrics must never break a pull
        log.exception("record_pull failed")


class GpuCollector(Collector):
    """Per-GPU utilization and memory, read through NVML at scrape time."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(GPU_METRIC_NAMES[0], "GPU busy fraction over NVML's last sample period, 0..1", labels=GPU_LABELS),
            GaugeMetricFamily(GPU_METRIC_NAMES[1], "GPU memory in use (bytes)", labels=GPU_LABELS),
            GaugeMetricFamily(GPU_METRIC_NAMES[2], "GPU memory installed (bytes)", labels=GPU_LABELS),
        )

    def describe(self):
        return list(self._families())

    def collect(self):
        util, used, total = self._families()
        n = self.nvml
        try:
            count = n.nvmlDeviceGetCount()
        except Exception:
            log.exception("NVML: cannot count devices")
            return
        for i in range(count):
            try:
                h = n.nvmlDeviceGetHandleByIndex(i)
                uuid = _text(n.nvmlDeviceGetUUID(h))
                name = _text(n.nvmlDeviceGetName(h))
                rates = n.nvmlDeviceGetUtilizationRates(h)
                mem = n.nvmlDeviceGetMemoryInfo(h)
            except Exception:  # one bad GPU must not hide the others
                log.exception("NVML: reading GPU %d failed", i)
                continue
            lv = [str(i), uuid, name]
            util.add_metric(lv, rates.gpu / 100.0)
            used.add_metric(lv, float(mem.used))
            total.add_metric(lv, float(mem.total))
        yield from (util, used, total)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def load_nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None where there is no library, driver or GPU."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.info("NVML unavailable (%s): no GPU metrics", type(e).__name__)
        return None
    return pynvml


_gpu_registered = False


def enable_gpu_metrics(registry: CollectorRegistry = REGISTRY) -> bool:
    """Register the NVML collector when a GPU is visible. Returns whether GPU metrics are exported."""
    global _gpu_registered
    with _lock:
        if _gpu_registered:
            return True
        nvml = load_nvml()
        if nvml is None:
            return False
        registry.register(GpuCollector(nvml))
        _gpu_registered = True
        return True


def start_exporter(port: int, host: str = "0.0.0.0") -> Any | None:
    """Serve ``REGISTRY`` on ``host:port`` (``/metrics``) from a daemon thread. ``port`` 0 disables it.

    A port already taken is logged and ignored: metrics must never stop a model replica from serving.
    Returns the server (``.shutdown()`` stops it) or None.
    """
    if not port:
        return None
    from prometheus_client import start_http_server

    gpu = enable_gpu_metrics()
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        log.warning("engine metrics exporter could not listen on %s:%s (%s)", host, port, e)
        return None
    log.info("engine metrics on http://%s:%s/metrics (GPU metrics: %s)", host, port, "on" if gpu else "absent")
    return server
