"""Helpers for tests that start real processes on 127.0.0.1: free ports, readiness waits, clean shutdown."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code in ok:
                return
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


def scrape_sum(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of a Prometheus family's samples at ``url`` whose labels include ``labels``."""
    text = httpx.get(url, timeout=10).text
    want = {f'{k}="{v}"' for k, v in (labels or {}).items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = set(line[len(name) + 1 : line.index("}")].split(","))
        elif line.startswith(name + " "):
            got = set()
        else:
            continue
        if want <= got:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond()`` every 50 ms until it returns something true (returned), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


class Proc:
    """A child process in its own process group, with its output in a log file; stop() never leaves orphans."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, name: str = "proc", cwd: str | None = None):
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd or str(REPO)
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        # Reap anything left in the group (vLLM helpers).
        self.signal(signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


class Engine:
    """A real vLLM CPU engine started through ``llm-engine run``."""

    def __init__(self, model: str, served_name: str = "tiny", extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served_name = served_name
        # Our engine exporter (engine/metrics.py), beside vLLM's own /metrics.
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.tmp = tempfile.mkdtemp(prefix="vllm-tmp-")
        env = {
            "ENGINE_MODEL": model,
            "ENGINE_SERVED_MODEL_NAME": served_name,
            "ENGINE_PORT": str(self.port),
            "ENGINE_METRICS_PORT": str(self.metrics_port),
            "ENGINE_HOST": "127.0.0.1",
            "ENGINE_CPU_KV_CACHE": "64M",
            "ENGINE_MAX_MODEL_LEN": "1024",
            "ENGINE_MAX_NUM_SEQS": "32",
            "TMPDIR": self.tmp,
            "OMP_NUM_THREADS": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_TARGET_DEVICE": "cpu",
        }
        env.update(extra_env or {})
        self.proc = Proc([PY, "-m", "engine", "run"], env=env, name=f"engine-{served_name}")

    def wait_ready(self, timeout: float = 240) -> Engine:
        try:
            wait_http(self.url + "/health", timeout, self.proc.proc)
        except Exception as e:
            raise RuntimeError(f"engine failed to start: {e}\n--- log tail ---\n{self.proc.log()[-4000:]}") from e
        return self

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in vLLM's /metrics (e.g. vllm:num_requests_running)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.stop(timeout=30)


class Gateway:
    """``llm-gateway serve`` as a subprocess, with a YAML config written from ``config``."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None, name: str = "gateway"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, path = tempfile.mkstemp(prefix="gateway-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f)
        self.config_path = path
        # /metrics has its own port (gateway/metrics_server.py); a config's metrics_port: 0 overrides it.
        self.metrics_port = free_port()
        if config.get("metrics_port") == 0:
            self.metrics_url = self.url + "/metrics"
        else:
            self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        full_env = {
            "GATEWAY_CONFIG": path,
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_METRICS_PORT": str(self.metrics_port if config.get("metrics_port") != 0 else 0),
        }
        full_env.update(env or {})
        self.proc = Proc([PY, "-m", "gateway", "serve"], env=full_env, name=name)

    def wait_ready(self, timeout: float = 30, path: str = "/healthz") -> Gateway:
        try:
            wait_http(self.url + path, timeout, self.proc.proc)
        except Exception as e:
            raise RuntimeError(f"gateway failed to start: {e}\n--- log ---\n{self.proc.log()[-4000:]}") from e
        return self

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.proc.stop()


class S3Server:
    """A real S3 server (nanio: SigV4 checks, multipart, ranged GETs) on 127.0.0.1 with its own data dir."""

    access_key = "test-access-key"
    secret_key = "test-secret-key-0123456789"
    region = "us-east-1"

    def __init__(self, port: int | None = None, data_dir: str | None = None) -> None:
        """A new server; with ``port`` and ``data_dir`` of a stopped one, that server again (same objects)."""
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="nanio-")
        env = {"NANIO_ACCESS_KEY": self.access_key, "NANIO_SECRET_KEY": self.secret_key}
        self.proc = Proc(
            [PY, "-m", "nanio", "serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", self.data_dir,
             "--no-access-log", "--log-level", "warning"],
            env=env, name="nanio",
        )

    def wait_ready(self, timeout: float = 30) -> S3Server:
        wait_http(self.endpoint + "/", timeout, self.proc.proc, ok=(200, 403, 400, 404))
        return self

    def env(self) -> dict[str, str]:
        """The standard variables a client (llm-engine, the audit archiver) reads."""
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self):
        from minio import Minio

        return Minio(f"127.0.0.1:{self.port}", access_key=self.access_key, secret_key=self.secret_key, secure=False, region=self.region)

    def stop(self) -> None:
        self.proc.stop()
