#!/usr/bin/env python3
"""req/s scaling from one worker process to two: the gateway (in-memory and Redis quotas) beside a bare proxy.

Measures, against an nginx upstream that answers at once (an OpenAI chat completion as JSON on one port, an SSE
body of 16 token events + usage + ``[DONE]`` on another), for every system and mode, in interleaved rounds:

- ``bare-1w`` / ``bare-2w``: a bare ASGI endpoint with an aiohttp client (the side-by-side harness's
  ``proxies/proxy_asgi.py``, no features) under uvicorn (uvloop, httptools), 1 worker / ``--workers 2``;
- ``mem-1w`` / ``mem-2w``: our gateway, ``python -m gateway.cli serve`` with the harness's ``ours/full.yaml``
  (API key + in-memory quotas that never refuse + hash-chained file audit, one file per worker + metrics +
  access log), ``GATEWAY_WORKERS=1`` / ``2``;
- ``redis-1w`` / ``redis-2w``: the same with ``ours/full-redis.yaml`` (quota state in a local redis-server).

Each (round, system, mode): start the system, wait until it answers a valid completion, ``wrk -d<warmup>s``
warm-up, then ``wrk -t4 -c<C> -d<duration>s`` for each connection count (``--conns``; the counts after the
first are skipped once ``--budget-s`` is spent). Recorded per run: req/s, p50/p99 (wrk's Lua ``done`` hook),
errors (any non-2xx or socket error makes the run suspect), CPU seconds of the system's process tree
(supervisor + workers, utime + stime from /proc) and of redis-server, hence CPU µs per request.

With ``--pin`` (default when the machine has >= 12 CPUs) a system with N workers runs on CPUs 0..N-1, wrk on
4-7, nginx on 8-9, redis-server on 10, this driver on 12 (``os.sched_setaffinity``). Whether pinning takes
effect is tested first (two busy loops on one CPU for 1 s: ~1 s of CPU together if it does, ~2 s if not) and
recorded; without it the worker count alone bounds the gateway's CPU.

Writes ``scaling.json`` (every run + medians + ratios) and ``scaling.md`` to ``--out`` after every run.

    python scripts/bench_scaling.py --perf <side-by-side harness dir> --repo . --out /tmp/scaling \\
        [--systems bare-1w,bare-2w,mem-1w,mem-2w,redis-1w,redis-2w] [--modes json,sse] [--rounds 2] \\
        [--duration 8] [--warmup 2] [--conns 128,64] [--budget-s 480] [--port-base 18000]

Several calls (e.g. a further round at one connection count) into one result, medians over all rounds:

    python scripts/bench_scaling.py merge OUT_DIR first/scaling.json second/scaling.json

Needs ``wrk``, ``nginx`` and ``redis-server`` on PATH. ``scripts/gpu/proxy_scaling_h200.sh`` runs it on the
H200 host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
API_KEY = "sk-bench-1234"
REQ = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "Say hello in one short sentence, please."}],
    "max_tokens": 16,
    "temperature": 0,
}
ALL_SYSTEMS = ["bare-1w", "bare-2w", "mem-1w", "mem-2w", "redis-1w", "redis-2w"]
LABELS = {
    "bare": "bare ASGI endpoint + aiohttp (no features)",
    "mem": "ours, key + in-memory quotas + audit",
    "redis": "ours, key + quotas in Redis + audit",
}
T0 = time.time()


def log(*a: object) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ---------------------------------------------------------------- /proc
def proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def session_pids(sid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                if int(parts[3]) == sid:
                    out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


def tree_ticks(sid: int) -> dict[int, int]:
    """utime + stime of every process in the session (the supervisor and its workers), by pid."""
    return {p: proc_ticks(p) for p in session_pids(sid)}


# ---------------------------------------------------------------- pinning
def affinity(cpus: list[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None

    def pre() -> None:
        os.sched_setaffinity(0, cpus)

    return pre


def pinning_check() -> dict[str, Any]:
    """Two busy loops on CPU 0 for 1 s of wall time: does the kernel honour the affinity?"""
    res: dict[str, Any] = {}
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
        code = "import time\nt=time.time()\nwhile time.time()-t<1.0: pass\n"
        ps = [
            subprocess.Popen([sys.executable, "-c", code], preexec_fn=affinity([0]), start_new_session=True)
            for _ in range(2)
        ]
        cpu = 0.0
        for p in ps:
            _, _, ru = os.wait4(p.pid, 0)
            cpu += ru.ru_utime + ru.ru_stime
        res["two_spinners_on_cpu0_cpu_s"] = round(cpu, 3)
        res["effective"] = cpu < 1.5
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            preexec_fn=affinity([0]),
            capture_output=True,
            text=True,
        )
        res["child_affinity_reads"] = out.stdout.strip()
    except OSError as e:
        res["error"] = repr(e)
        res["effective"] = False
    return res


# ---------------------------------------------------------------- helpers
def port_open(port: int) -> bool:
    s = socket.socket()
    s.settimeout(0.3)
    try:
        return s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        s.close()


def wait_port(port: int, up: bool, limit: float = 20.0) -> None:
    t = time.time()
    while time.time() - t < limit:
        if port_open(port) == up:
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} still {'closed' if up else 'open'} after {limit}s")


def probe(port: int, mode: str, timeout: float = 5.0) -> tuple[bool, str]:
    body: dict[str, Any] = dict(REQ, stream=(mode == "sse"))
    if mode == "sse":
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read().decode()
        ctype = r.headers.get("content-type", "")
    if mode == "json":
        d = json.loads(data)
        ok = d.get("object") == "chat.completion" and "usage" in d
    else:
        ok = data.rstrip().endswith("data: [DONE]") and data.count("chat.completion.chunk") >= 16
        ok = ok and "text/event-stream" in ctype
    return ok, data


def wait_ready(port: int, mode: str, proc: subprocess.Popen[bytes], limit: float = 60.0) -> float:
    t0 = time.time()
    last = ""
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with rc={proc.returncode}")
        try:
            ok, data = probe(port, mode)
            if ok:
                ready = time.time() - t0
                for _ in range(5):
                    probe(port, mode, timeout=30)
                return ready
            last = f"invalid response: {data[:300]!r}"
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = repr(e)
        time.sleep(0.3)
    raise RuntimeError(f"not ready after {limit}s: {last}")


def kill_session(p: subprocess.Popen[bytes] | None) -> None:
    if p is None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)
    for _ in range(50):
        if not session_pids(p.pid):
            return
        time.sleep(0.1)
    for q in session_pids(p.pid):
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- the bench
class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = tempfile.mkdtemp(prefix="scaling-")
        self.perf = os.path.join(self.work, "perf")
        shutil.copytree(
            a.perf, self.perf, ignore=shutil.ignore_patterns("nginx", "results", "venv-*", "__pycache__")
        )
        self.ncpu = os.cpu_count() or 1
        self.pin = a.pin if a.pin is not None else self.ncpu >= 12
        self.p_json, self.p_sse, self.p_redis = a.port_base, a.port_base + 1, a.port_base + 2
        self.p_sys, self.p_metrics = a.port_base + 10, a.port_base + 11
        self.upstream = {"json": f"http://127.0.0.1:{self.p_json}", "sse": f"http://127.0.0.1:{self.p_sse}"}
        self.nginx: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None
        self.runs: list[dict[str, Any]] = []
        self.failures: dict[str, str] = {}
        self.meta: dict[str, Any] = {}

    def cpus(self, role: str, workers: int = 1) -> list[int] | None:
        if not self.pin:
            return None
        return {
            "system": list(range(workers)),
            "wrk": [4, 5, 6, 7],
            "nginx": [8, 9],
            "redis": [10],
            "driver": [12],
        }[role]

    # -- upstream and redis
    def start_nginx(self) -> None:
        out = subprocess.run(
            [sys.executable, os.path.join(self.perf, "gen_nginx.py")],
            capture_output=True,
            text=True,
            check=True,
        )
        log(out.stdout.strip())
        ng = os.path.join(self.perf, "nginx")
        conf = os.path.join(ng, "nginx.conf")
        text = open(conf).read()
        text = text.replace("worker_processes 1;", f"worker_processes {self.a.nginx_workers};")
        text = text.replace("127.0.0.1:18000", f"127.0.0.1:{self.p_json}")
        text = text.replace("127.0.0.1:18001", f"127.0.0.1:{self.p_sse}")
        with open(conf, "w") as f:
            f.write(text)
        self.nginx = subprocess.Popen(
            ["nginx", "-c", conf, "-e", os.path.join(ng, "logs/error.log"), "-p", ng],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=affinity(self.cpus("nginx")),
        )
        wait_port(self.p_json, True)
        wait_port(self.p_sse, True)

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.p_redis),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=open(os.path.join(self.work, "redis.log"), "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=affinity(self.cpus("redis")),
        )
        wait_port(self.p_redis, True)

    # -- systems
    def command(self, system: str, mode: str, rundir: str) -> tuple[list[str], dict[str, str]]:
        kind, w = system.split("-")
        workers = int(w.rstrip("w"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if kind == "bare":
            env.update(UPSTREAM=self.upstream[mode], CLIENT="aiohttp")
            cmd = [
                self.a.python,
                "-m",
                "uvicorn",
                "--app-dir",
                os.path.join(self.perf, "proxies"),
                "proxy_asgi:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.p_sys),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ]
            if workers > 1:
                cmd += ["--workers", str(workers)]
            return cmd, env
        profile = "full" if kind == "mem" else "full-redis"
        text = open(os.path.join(self.perf, "ours", f"{profile}.yaml")).read()
        text = text.replace("@UPSTREAM@", self.upstream[mode]).replace("@RUN@", rundir)
        # one hash-chained audit file per worker (required with several workers; kept alike with one)
        text = text.replace("/audit/audit.jsonl", "/audit/audit.{pid}.jsonl")
        text = text.replace("redis://127.0.0.1:16379/", f"redis://127.0.0.1:{self.p_redis}/")
        cfg = os.path.join(rundir, "gateway.yaml")
        with open(cfg, "w") as f:
            f.write(text)
        pp = [self.a.repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env.update(
            PYTHONPATH=os.pathsep.join(pp),
            GATEWAY_CONFIG=cfg,
            GATEWAY_METRICS_PORT=str(self.p_metrics),
            GATEWAY_WORKERS=str(workers),
        )
        cmd = [self.a.python, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(self.p_sys)]
        return cmd, env

    def wrk(self, mode: str, conns: int, duration: float, sid: int) -> dict[str, Any]:
        env = dict(os.environ, STREAM="1" if mode == "sse" else "0", API_KEY=API_KEY)
        cmd = [
            "wrk",
            f"-t{self.a.wrk_threads}",
            f"-c{conns}",
            f"-d{duration:g}s",
            "--timeout",
            "30s",
            "-s",
            os.path.join(self.perf, "wrk/chat.lua"),
            f"http://127.0.0.1:{self.p_sys}/v1/chat/completions",
        ]
        t_sys0 = tree_ticks(sid)
        t_red0 = proc_ticks(self.redis.pid) if self.redis else 0
        t0 = time.time()
        p = subprocess.run(
            cmd, capture_output=True, text=True, env=env, preexec_fn=affinity(self.cpus("wrk"))
        )
        wall = time.time() - t0
        t_sys1 = tree_ticks(sid)
        t_red1 = proc_ticks(self.redis.pid) if self.redis else 0
        m = re.search(r"BENCH_JSON (\{.*\})", p.stdout)
        if not m:
            raise RuntimeError(f"wrk failed rc={p.returncode}: {(p.stdout + p.stderr)[-500:]}")
        r = json.loads(m.group(1))
        secs = r["duration_us"] / 1e6
        n = max(r["requests"], 1)
        per_proc = sorted(((t - t_sys0.get(pid, 0)) / TICK for pid, t in t_sys1.items()), reverse=True)
        sys_s = sum(per_proc)
        red_s = (t_red1 - t_red0) / TICK
        return {
            "requests": r["requests"],
            "rps": r["requests"] / secs,
            "duration_s": secs,
            "wall_s": wall,
            "errors": r["errors"],
            "err_total": sum(r["errors"].values()),
            "p50_ms": r["lat_us"]["p50"] / 1000,
            "p99_ms": r["lat_us"]["p99"] / 1000,
            "system_cpu_s": sys_s,
            "system_us_per_req": sys_s * 1e6 / n,
            "system_cores": sys_s / secs,
            # how the load spread over the processes (workers first): one busy worker = unbalanced accepts
            "per_process_cpu_s": [round(x, 2) for x in per_proc if x >= 0.01],
            "redis_cpu_s": red_s,
            "redis_us_per_req": red_s * 1e6 / n,
        }

    def one(self, rnd: int, system: str, mode: str) -> None:
        a = self.a
        workers = int(system.split("-")[1].rstrip("w"))
        rundir = tempfile.mkdtemp(prefix=f"{system}-{mode}-", dir=self.work)
        cmd, env = self.command(system, mode, rundir)
        logf = os.path.join(rundir, "system.log")
        wait_port(self.p_sys, False)
        wait_port(self.p_metrics, False)
        p = subprocess.Popen(
            cmd,
            stdout=open(logf, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=self.perf,
            preexec_fn=affinity(self.cpus("system", workers)),
        )
        try:
            try:
                ready = wait_ready(self.p_sys, mode, p)
            except RuntimeError as e:
                msg = f"{system}/{mode}: {e}\n--- log tail ---\n{tail(logf)}"
                log("FAILED TO START", msg)
                self.failures[system] = msg
                return
            log(f"round {rnd} {system} {mode}: ready in {ready:.1f}s; warm-up {a.warmup}s")
            self.wrk(mode, a.conns[0], a.warmup, p.pid)
            for i, c in enumerate(a.conns):
                if i > 0 and time.time() - T0 > a.budget_s:
                    log(f"  skip c{c}: budget spent")
                    continue
                r = self.wrk(mode, c, a.duration, p.pid)
                r.update(round=rnd, system=system, mode=mode, conns=c, workers=workers, ready_s=ready)
                self.runs.append(r)
                log(
                    f"  c{c}: {r['rps']:.0f} req/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms "
                    f"err {r['err_total']} cpu {r['system_us_per_req']:.0f} us/req ({r['system_cores']:.2f} cores "
                    f"{r['per_process_cpu_s']})"
                    + (f" redis {r['redis_us_per_req']:.0f} us/req" if system.startswith("redis") else "")
                )
                if r["err_total"]:
                    log(f"  errors {r['errors']}; log tail:\n{tail(logf, 800)}")
        except Exception as e:  # noqa: BLE001 - keep the other systems' runs
            msg = f"{system}/{mode} round {rnd}: {e!r}\n--- log tail ---\n{tail(logf)}"
            log("RUN FAILED", msg)
            self.failures[system] = msg
        finally:
            kill_session(p)
            shutil.rmtree(rundir, ignore_errors=True)
            self.write()

    def run(self) -> None:
        a = self.a
        if self.pin:
            os.sched_setaffinity(0, self.cpus("driver") or [0])
        self.meta = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(),
            "kernel": platform.release(),
            "cpus": self.ncpu,
            "python": subprocess.run(
                [a.python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True
            ).stdout.strip(),
            "pin": self.pin,
            "pinning_check": pinning_check() if self.pin else None,
            "layout": (
                "system N workers on CPUs 0..N-1, wrk 4-7, nginx 8-9, redis-server 10, driver 12"
                if self.pin
                else "no pinning"
            ),
            "nginx_workers": a.nginx_workers,
            "rounds": a.rounds,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "conns": a.conns,
            "wrk": f"wrk -t{a.wrk_threads} -c<C> -d{a.duration:g}s --timeout 30s -s wrk/chat.lua (after a "
            f"-d{a.warmup:g}s warm-up at -c{a.conns[0]})",
            "argv": sys.argv,
        }
        log("meta", json.dumps(self.meta))
        try:
            self.start_nginx()
            if any(s.startswith("redis") for s in a.systems):
                self.start_redis()
            for rnd in range(1, a.rounds + 1):
                order = a.systems if rnd % 2 else list(reversed(a.systems))
                for system in order:
                    for mode in a.modes:
                        if system in self.failures:
                            continue
                        if time.time() - T0 > a.hard_s:
                            log(f"hard budget spent: skipping round {rnd} {system} {mode}")
                            continue
                        self.one(rnd, system, mode)
        finally:
            kill_session(self.redis)
            kill_session(self.nginx)
            self.write()
            shutil.rmtree(self.work, ignore_errors=True)

    # -- results
    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.runs, self.a.systems, self.a.modes, self.a.conns)

    def write(self) -> None:
        rows = self.summary()
        data = {"meta": self.meta, "summary": rows, "runs": self.runs, "failures": self.failures}
        os.makedirs(self.a.out, exist_ok=True)
        with open(os.path.join(self.a.out, "scaling.json"), "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(self.a.out, "scaling.md"), "w") as f:
            f.write(markdown(data))


def summarize(
    runs: list[dict[str, Any]], systems: list[str], modes: list[str], conns: list[int]
) -> list[dict[str, Any]]:
    rows = []
    for system in systems:
        for mode in modes:
            for c in conns:
                rs = [r for r in runs if (r["system"], r["mode"], r["conns"]) == (system, mode, c)]
                if not rs:
                    continue

                def med(k: str, rs: list[dict[str, Any]] = rs) -> float:
                    return statistics.median(r[k] for r in rs)

                rows.append(
                    {
                        "system": system,
                        "mode": mode,
                        "conns": c,
                        "n": len(rs),
                        "rps": med("rps"),
                        "rps_rounds": [round(r["rps"]) for r in rs],
                        "p50_ms": med("p50_ms"),
                        "p99_ms": med("p99_ms"),
                        "system_us_per_req": med("system_us_per_req"),
                        "system_cores": med("system_cores"),
                        "redis_us_per_req": med("redis_us_per_req"),
                        "errors": sum(r["err_total"] for r in rs),
                        "cpu_s_by_process": [r["per_process_cpu_s"] for r in rs],
                    }
                )
    idx = {(r["system"], r["mode"], r["conns"]): r for r in rows}
    for r in rows:
        kind, w = r["system"].split("-")
        one = idx.get((f"{kind}-1w", r["mode"], r["conns"]))
        bare = idx.get((f"bare-{w}", r["mode"], r["conns"]))
        r["vs_1w"] = r["rps"] / one["rps"] if one else None
        r["vs_bare"] = r["rps"] / bare["rps"] if bare else None
    return rows


def merge(out: str, files: list[str]) -> None:
    """Several runs of this script (same systems) as one: rounds renumbered in file order, medians over all."""
    runs: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    calls = []
    for path in files:
        with open(path) as f:
            d = json.load(f)
        base = max((r["round"] for r in runs), default=0)
        for r in d["runs"]:
            runs.append(dict(r, round=base + r["round"]))
        failures.update(d["failures"])
        calls.append({k: d["meta"][k] for k in ("started", "rounds", "conns")})
    meta = dict(json.load(open(files[0]))["meta"])
    systems = [s for s in ALL_SYSTEMS if any(r["system"] == s for r in runs)]
    modes = [m for m in ("json", "sse") if any(r["mode"] == m for r in runs)]
    conns = sorted({r["conns"] for r in runs}, reverse=True)
    meta.update(rounds=max(r["round"] for r in runs), conns=conns, calls=calls)
    data = {
        "meta": meta,
        "summary": summarize(runs, systems, modes, conns),
        "runs": runs,
        "failures": failures,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scaling.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write(markdown(data))


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def markdown(data: dict[str, Any]) -> str:
    m = data["meta"]
    out = [
        "# req/s scaling from one worker to two",
        "",
        f"Machine: {m.get('host')} ({m.get('cpus')} CPUs, kernel {m.get('kernel')}), Python {m.get('python')}; "
        f"pinning: {m.get('layout')}; check: {json.dumps(m.get('pinning_check'))}. nginx upstream with "
        f"{m.get('nginx_workers')} workers. {m.get('rounds')} interleaved rounds, medians; {m.get('wrk')}.",
        "",
        "| system | workers | mode | conns | req/s (rounds) | vs 1 worker | vs bare, same workers | p50 / p99 ms "
        "| CPU µs/req | cores busy | CPU s by process (round 1) | redis-server µs/req | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["summary"]:
        kind, w = r["system"].split("-")
        rounds = ", ".join(f"{x:,}" for x in r["rps_rounds"])
        redis = fmt(r["redis_us_per_req"], ".0f") if kind == "redis" else ""
        out.append(
            f"| {LABELS[kind]} | {w.rstrip('w')} | {r['mode']} | {r['conns']} | {r['rps']:,.0f} ({rounds}) "
            f"| {ratio(r['vs_1w'])} | {ratio(r['vs_bare'])} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} "
            f"| {r['system_us_per_req']:.0f} | {r['system_cores']:.2f} "
            f"| {' + '.join(f'{x:g}' for x in r['cpu_s_by_process'][0])} | {redis} | {r['errors']} |"
        )
    if data["failures"]:
        out += ["", "Systems that did not start:", ""]
        out += [f"- {k}: {v.splitlines()[0]}" for k, v in data["failures"].items()]
    return "\n".join(out) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["merge"]:
        if len(sys.argv) < 5:
            print("usage: bench_scaling.py merge OUT_DIR A/scaling.json B/scaling.json ...", file=sys.stderr)
            return 2
        merge(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--perf", required=True, help="the side-by-side harness (gen_nginx.py, wrk/, proxies/, ours/)"
    )
    ap.add_argument("--repo", default=os.getcwd(), help="the project tree (PYTHONPATH of the gateway)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", required=True)
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    ap.add_argument("--modes", default="json,sse")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--conns", default="128,64")
    ap.add_argument("--wrk-threads", type=int, default=4)
    ap.add_argument("--nginx-workers", type=int, default=2)
    ap.add_argument(
        "--budget-s", type=float, default=1e9, help="after this many seconds, only the first conns"
    )
    ap.add_argument("--hard-s", type=float, default=1e9, help="after this many seconds, start nothing new")
    ap.add_argument("--port-base", type=int, default=18000)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None)
    a = ap.parse_args()
    a.systems = [s for s in a.systems.split(",") if s]
    a.modes = [s for s in a.modes.split(",") if s]
    a.conns = [int(c) for c in a.conns.split(",") if c]
    a.perf, a.repo, a.out = os.path.abspath(a.perf), os.path.abspath(a.repo), os.path.abspath(a.out)
    for s in a.systems:
        if s not in ALL_SYSTEMS:
            print(f"bench_scaling: unknown system {s!r} (known: {', '.join(ALL_SYSTEMS)})", file=sys.stderr)
            return 2
    for tool in ("wrk", "nginx") + (
        ("redis-server",) if any(s.startswith("redis") for s in a.systems) else ()
    ):
        if not shutil.which(tool):
            print(f"bench_scaling: {tool} not found on PATH", file=sys.stderr)
            return 2
    Bench(a).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
