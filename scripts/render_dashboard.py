#!/usr/bin/env python3
"""Render the Grafana dashboard's main panels to a PNG from real scraped data.

It runs a real Prometheus (the ``prometheus`` binary: ``apt-get install prometheus``) that scrapes the
gateway, vLLM's /metrics and our engine exporter every second, drives a short traffic run through the
gateway, then evaluates the dashboard's own PromQL (configs/grafana/llm-stack-dashboard.json) over that
window and draws the panels with matplotlib.

By default it starts everything itself on 127.0.0.1 (a real vLLM CPU engine on the tiny test model and a
gateway in front of it). Or point it at a running stack:

    python scripts/render_dashboard.py                       # start engine + gateway, 60 s of traffic
    python scripts/render_dashboard.py --gateway http://gw:8080 --vllm http://engine:8000 \
        --engine-exporter http://engine:9400 --api-key sk-... --model my-model

Output: docs/img/dashboard.png (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DASHBOARD = REPO / "configs" / "grafana" / "llm-stack-dashboard.json"
MAIN_PANELS = [
    "Requests / s by status class",
    "Request latency p50 / p99 (objective: p99 < 500 ms)",
    "Time to first token p50 / p99",
    "Token throughput (tokens / s)",
    "Inter-token latency p50 / p99",
    "In-flight requests",
    "Gateway overhead before forwarding p50 / p99",
    "Requests / s by tenant",
    "Engine requests running / waiting",
    "KV cache usage",
    "Engine generation tokens / s",
    "GPU utilization (scale out above 85 %)",
]
RATE_INTERVAL = "10s"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hostport(url: str) -> str:
    return re.sub(r"^https?://", "", url).rstrip("/")


class Prometheus:
    """A real Prometheus server scraping the given targets every second, with a throwaway TSDB."""

    def __init__(self, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise SystemExit("render_dashboard: needs the prometheus binary (apt-get install -y prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="prom-render-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [_hostport(u)]}]} for job, u in targets.items()
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)
        raise SystemExit("prometheus did not become ready")

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query_range",
                      params={"query": expr, "start": start, "end": end, "step": step}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query failed: {expr}: {body.get('error')}")
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def drive_traffic(gateway: str, keys: list[str], model: str, seconds: float, stop: threading.Event) -> dict[str, int]:
    """Three phases of rising concurrency (1, 3, 6 clients): streamed chats and plain completions, plus a few
    refused requests, so every panel has something to show."""
    counts: dict[str, int] = {}
    lock = threading.Lock()
    t_end = time.monotonic() + seconds

    def client(idx: int, start_at: float) -> None:
        rnd = random.Random(idx)
        while time.monotonic() < start_at and not stop.is_set():
            time.sleep(0.05)
        with httpx.Client(base_url=gateway, timeout=120) as c:
            while time.monotonic() < t_end and not stop.is_set():
                key = keys[idx % len(keys)]
                h = {"authorization": f"Bearer {key}"}
                roll = rnd.random()
                try:
                    if roll < 0.03:
                        r = c.post("/v1/completions", json={"model": model, "prompt": "x"})  # no key: 401
                    elif roll < 0.5:
                        r = c.post("/v1/chat/completions", headers=h, json={
                            "model": model, "messages": [{"role": "user", "content": "tell me " * rnd.randint(1, 40)}],
                            "max_tokens": rnd.randint(8, 96), "ignore_eos": True, "stream": True})
                    else:
                        r = c.post("/v1/completions", headers=h, json={
                            "model": model, "prompt": "once upon " * rnd.randint(1, 40),
                            "max_tokens": rnd.randint(4, 64), "ignore_eos": True})
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    counts[code] = counts.get(code, 0) + 1

    threads = []
    t0 = time.monotonic()
    for i, (n, frac) in enumerate([(1, 0.0), (2, 1 / 3), (3, 2 / 3)]):
        for j in range(n):
            threads.append(threading.Thread(target=client, args=(i * 10 + j, t0 + frac * seconds), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def render(prom: Prometheus, start: float, end: float, out: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dash["panels"] if p.get("type") == "timeseries"}
    chosen = [panels[t] for t in MAIN_PANELS if t in panels]
    cols = 3
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 6.2, rows * 3.4), squeeze=False)
    step = max(1.0, (end - start) / 240)
    for ax, p in zip(axes.flat, chosen, strict=False):
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        scale, ylabel = {"s": (1000.0, "ms"), "percentunit": (100.0, "%")}.get(unit, (1.0, unit))
        drawn = 0
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*")
            for series in prom.query_range(expr, start, end, step):
                xs = [float(v[0]) - start for v in series["values"]]
                ys = [float(v[1]) * scale for v in series["values"]]
                ax.plot(xs, ys, label=_legend(t.get("legendFormat", ""), series["metric"]), linewidth=1.4)
                drawn += 1
        ax.set_title(p["title"], fontsize=10)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data in this run\n(GPU-only metric: absent on CPU)" if "GPU" in p["title"]
                    else "no data in this run", ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle(f"{dash['title']} — {note}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway", help="gateway base URL (default: start an engine and a gateway here)")
    ap.add_argument("--vllm", help="an engine's vLLM URL (its /metrics is scraped)")
    ap.add_argument("--engine-exporter", help="an engine's exporter URL (ENGINE_METRICS_PORT)")
    ap.add_argument("--api-key", action="append", help="API key(s) for the traffic (repeat for tenants)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the traffic run")
    ap.add_argument("--out", default=str(REPO / "docs" / "img" / "dashboard.png"))
    args = ap.parse_args()

    started: list[Any] = []
    prom = None
    try:
        if args.gateway:
            gateway, keys = args.gateway.rstrip("/"), args.api_key or []
            if not keys:
                raise SystemExit("--api-key is needed with --gateway")
            targets = {"llm-gateway": gateway}
            if args.vllm:
                targets["vllm"] = args.vllm
            if args.engine_exporter:
                targets["llm-engine"] = args.engine_exporter
            note = f"{args.seconds:.0f} s of traffic against {gateway}"
        else:
            from engine.testmodel import build_test_model
            from tests.conftest import KEY_ALL, default_keys, gateway_config
            from tests.support import Engine, Gateway, sha256_hex

            model_dir = build_test_model(REPO / ".cache" / "tests" / "tiny-seed0", seed=0)
            print("starting a vLLM CPU engine on the tiny test model ...", flush=True)
            eng = Engine(str(model_dir), served_name=args.model)
            started.append(eng)
            eng.wait_ready()
            other_key = "sk-render-team-c"
            keys_cfg = default_keys() + [{"id": "render", "sha256": sha256_hex(other_key), "tenant": "team-c"}]
            gw = Gateway(gateway_config([eng.url], api_keys=keys_cfg))
            started.append(gw)
            gw.wait_ready()
            gateway, keys = gw.url, [KEY_ALL, other_key]
            targets = {"llm-gateway": gw.metrics_url.removesuffix("/metrics"), "vllm": eng.url, "llm-engine": f"http://127.0.0.1:{eng.metrics_port}"}
            note = f"tiny model on vLLM CPU, {args.seconds:.0f} s of traffic (this 2-core CPU box)"
        prom = Prometheus(targets)
        time.sleep(3)
        start = time.time()
        counts = drive_traffic(gateway, keys, args.model, args.seconds, threading.Event())
        time.sleep(3)
        end = time.time()
        print("responses by status:", counts, flush=True)
        render(prom, start, end, Path(args.out), note)
    finally:
        if prom is not None:
            prom.stop()
        for p in reversed(started):
            p.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
