"""scripts/opcount.py counts the Python work per request that it was asked to count, and nothing outside."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.support import REPO


def _load():
    spec = importlib.util.spec_from_file_location("opcount", REPO / "scripts" / "opcount.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def request_context(n: int) -> int:  # named like the proxy's per-request function the counter keys on
    total = 0
    for i in range(n):
        total += i
    return total


def _count(oc, out, loops: int) -> dict:
    """Count three calls of ``request_context(loops)`` between the start and stop signals."""
    before = sys.gettrace()
    try:
        oc._start(0, sys._getframe())
        for _ in range(3):
            request_context(loops)
        oc._stop(0, None)
    finally:
        sys.settrace(before)
    return json.loads(out.read_text())


def test_counts_requests_and_more_work_per_request_for_more_work(tmp_path, monkeypatch):
    oc = _load()
    out = tmp_path / "count.json"
    monkeypatch.setenv("OPCOUNT_OUT", str(out))
    request_context(1000)  # before the start signal: not counted
    small = _count(oc, out, 5)
    assert small["requests"] == 3
    assert any(r["function"].endswith(":request_context") for r in small["top"])
    assert out.with_suffix(".md").read_text().startswith("requests 3,")
    big = _count(oc, out, 50)
    assert big["requests"] == 3
    assert big["instructions_per_request"] > small["instructions_per_request"] + 100
