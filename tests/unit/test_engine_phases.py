"""Engine start phases: one line each, in order, with the elapsed time, recognised in vLLM's log lines."""

from __future__ import annotations

import io
import re

from engine.phases import Phases

# Lines as vLLM's GPU build logs them (prefixes shortened), in order, with noise between.
GPU_LOG = """\
INFO 11-29 10:00:01 [api_server.py:1] vLLM API server version 0.24.0
INFO 11-29 10:00:05 [gpu_model_runner.py:2] Starting to load model /cache/model...
INFO 11-29 10:00:09 [default_loader.py:3] Loading weights took 3.10 seconds
INFO 11-29 10:00:10 [backends.py:4] Dynamo bytecode transform time: 4.2 s
INFO 11-29 10:00:20 [backends.py:5] Compiling a graph for compile range (1, 8192) takes 9.8 s
Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|##########| 67/67
INFO 11-29 10:00:41 [gpu_model_runner.py:6] Graph capturing finished in 12 secs, took 0.50 GiB
INFO 11-29 10:00:45 [core.py:7] Starting to load model again (must not repeat the phase)
"""


def test_gpu_phases_in_order_once_each_with_elapsed_time() -> None:
    out = io.StringIO()
    p = Phases(stream=out)
    p.enter("pulling s3://models/m")
    p.enter("starting vLLM")
    for line in GPU_LOG.splitlines():
        p.feed(line)
    p.enter("ready", "at http://127.0.0.1:8000")
    lines = out.getvalue().splitlines()
    assert [re.sub(r"^llm-engine: \[ *[0-9.]+s\] ", "", x) for x in lines] == [
        "pulling s3://models/m",
        "starting vLLM",
        "loading weights",
        "compiling",
        "capturing graphs",
        "ready at http://127.0.0.1:8000",
    ]
    assert all(re.match(r"^llm-engine: \[ *[0-9]+\.[0-9]s\] ", x) for x in lines)


def test_cpu_build_skips_compile_and_graphs() -> None:
    out = io.StringIO()
    p = Phases(stream=out)
    p.feed("INFO [cpu_model_runner.py] Starting to load model /m...")
    p.feed("INFO [cpu_model_runner.py] Warming up model")
    assert out.getvalue().count("\n") == 1 and "loading weights" in out.getvalue()
