"""One line per engine start phase, with the time since ``llm-engine run`` started:

    llm-engine: [   0.0s] pulling weights from s3://models/m
    llm-engine: [   3.2s] starting vLLM
    llm-engine: [   9.8s] loading weights
    llm-engine: [  14.1s] compiling
    llm-engine: [  41.0s] capturing graphs
    llm-engine: [  52.7s] ready at http://127.0.0.1:8000

vLLM's own phases are recognised in its log lines (the supervisor reads them on their way to stderr); a
phase vLLM skips (no compilation on the CPU build, no graphs in eager mode) prints nothing.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from typing import TextIO

# (phase, pattern in vLLM's log) in the order vLLM goes through them.
VLLM_PHASES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("loading weights", re.compile(r"Starting to load model|Loading safetensors|Loading weights")),
    ("compiling", re.compile(r"Starting torch\.compile|Compiling a graph|Dynamo bytecode transform")),
    ("capturing graphs", re.compile(r"Capturing CUDA graph|Capturing cudagraph", re.I)),
)


class Phases:
    """Prints each phase once, in order (a later phase is never followed by an earlier one)."""

    def __init__(self, start: float | None = None, stream: TextIO | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.stream = stream or sys.stderr
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def enter(self, phase: str, detail: str = "") -> None:
        with self._lock:
            if phase in self.seen:
                return
            self.seen.append(phase)
            elapsed = time.monotonic() - self.start
            text = f"{phase} {detail}".rstrip()
            self.stream.write(f"llm-engine: [{elapsed:7.1f}s] {text}\n")
            self.stream.flush()

    def feed(self, line: str) -> None:
        """Look at one vLLM log line."""
        for i, (phase, pattern) in enumerate(VLLM_PHASES):
            if pattern.search(line):
                later = {p for p, _ in VLLM_PHASES[i + 1 :]}
                if not later & set(self.seen):
                    self.enter(phase)
                return


# The process-wide instance: started when the engine module is imported by `llm-engine run`.
PHASES = Phases()
