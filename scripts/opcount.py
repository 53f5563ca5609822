"""Python work per request, counted instead of timed: bytecode instructions and calls the gateway executes.

Timing a proxy on a shared machine is noisy (this project's 2-core box varies by ±25 % between rounds); the
number of bytecode instructions the event-loop thread executes per request does not vary at all, so it shows
what a change to the hot path saved or added, function by function. It does not see work done in C (parsers,
encoders, hashing, syscalls): pair it with the side-by-side harness for time.

Run the gateway under it (same arguments as ``llm-gateway``), load it, and bracket the part to count with
signals::

    GATEWAY_CONFIG=gateway.yaml python scripts/opcount.py serve --host 127.0.0.1 --port 8080 &
    wrk -t1 -c8 -d2s -s chat.lua http://127.0.0.1:8080          # warm up
    kill -USR1 <pid>                                               # start counting
    wrk -t1 -c8 -d4s -s chat.lua http://127.0.0.1:8080
    kill -USR2 <pid>                                               # stop; writes the report

The report (``OPCOUNT_OUT``, default ``opcount.json`` + ``.md`` beside it) gives the requests seen (calls of
the proxy's ``request_context``), instructions and calls per request, and the 60 functions with the most
instructions per request. Tracing slows the gateway ~50x: keep the load light (a few connections).
Single worker only (``GATEWAY_WORKERS=1``).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

_ops: collections.Counter[tuple[str, str]] = collections.Counter()
_calls: collections.Counter[tuple[str, str]] = collections.Counter()


def _tracer(frame: FrameType, event: str, arg: Any) -> Any:
    code = frame.f_code
    if event == "call":
        frame.f_trace_opcodes = True
        _calls[(code.co_filename, code.co_name)] += 1
    elif event == "opcode":
        _ops[(code.co_filename, code.co_name)] += 1
    return _tracer


def _start(signum: int, frame: FrameType | None) -> None:
    _ops.clear()
    _calls.clear()
    sys.settrace(_tracer)
    f = frame
    while f is not None:  # the frames already running count from here on too
        f.f_trace = _tracer
        f.f_trace_opcodes = True
        f = f.f_back


def _short(path: str) -> str:
    for marker in ("/gateway/", "/site-packages/", "/lib/python3"):
        if marker in path:
            return (
                path.split(marker, 1)[1] if marker != "/gateway/" else "gateway/" + path.split(marker, 1)[1]
            )
    return os.path.basename(path)


def report() -> dict[str, Any]:
    requests = sum(n for (path, name), n in _calls.items() if name == "request_context")
    per = max(requests, 1)
    by_fn: collections.Counter[str] = collections.Counter()
    for (path, name), n in _ops.items():
        by_fn[f"{_short(path)}:{name}"] += n
    return {
        "requests": requests,
        "instructions_per_request": round(sum(_ops.values()) / per, 1),
        "calls_per_request": round(sum(_calls.values()) / per, 1),
        "top": [
            {"function": k, "instructions_per_request": round(v / per, 1)} for k, v in by_fn.most_common(60)
        ],
    }


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.settrace(None)
    out = Path(os.environ.get("OPCOUNT_OUT", "opcount.json"))
    rep = report()
    out.write_text(json.dumps(rep, indent=1) + "\n")
    lines = [
        f"requests {rep['requests']}, instructions per request {rep['instructions_per_request']}, "
        f"calls per request {rep['calls_per_request']}",
        "",
        "| instructions / request | function |",
        "|---|---|",
    ]
    lines += [f"| {r['instructions_per_request']} | `{r['function']}` |" for r in rep["top"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    from gateway.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
