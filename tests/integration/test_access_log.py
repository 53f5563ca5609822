"""The per-request access log: one JSON line per request at INFO by default (request id, principal, model,
status, tokens, TTFT, duration; no prompt text), off with one setting."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import KEY_ALL, MODEL


def access_lines(gw) -> list[dict]:
    out = []
    for line in gw.proc.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") == "gateway.access":
            out.append(rec)
    return out


def wait_line(gw, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        hit = [r for r in access_lines(gw) if r.get("request_id") == request_id]
        if hit:
            assert len(hit) == 1, hit
            return hit[0]
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {request_id}")


@pytest.mark.engine
def test_one_json_line_per_request_without_prompt_text(gateway) -> None:
    prompt = "access-log-canary-7f3a please count"
    headers = {"Authorization": f"Bearer {KEY_ALL}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 5}
    r = httpx.post(gateway.base_url + "/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200
    rec = wait_line(gateway, r.headers["x-request-id"])
    assert rec["level"] == "info" and rec["msg"] == "request"
    assert rec["principal"] == "all" and rec["tenant"] == "team-a" and rec["model"] == MODEL
    assert (
        rec["status"] == 200 and rec["decision"] == "allowed" and rec["route"].endswith("/chat/completions")
    )
    usage = r.json()["usage"]
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert rec["duration_ms"] > 0 and rec["ttft_ms"] is not None and 0 < rec["ttft_ms"] <= rec["duration_ms"]

    # a stream, and a refused request, get their line too
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        json={**body, "stream": True},
        headers=headers,
        timeout=120,
    ) as s:
        rid = s.headers["x-request-id"]
        assert s.status_code == 200 and b"[DONE]" in b"".join(s.iter_bytes())
    rec = wait_line(gateway, rid)
    assert rec["stream"] is True and rec["completion_tokens"] and rec["ttft_ms"] > 0
    bad = httpx.post(
        gateway.base_url + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-nope"}
    )
    rec = wait_line(gateway, bad.headers["x-request-id"])
    assert rec["status"] == 401 and rec["principal"] is None and rec["decision"] == "unauthenticated"
    assert prompt not in gateway.proc.log() and "access-log-canary" not in gateway.proc.log()


def test_off_with_one_setting(gateway_factory) -> None:
    cfg = {"models": [{"name": MODEL, "upstreams": ["http://127.0.0.1:9"]}], "auth_enabled": False}
    on = gateway_factory(cfg)
    off = gateway_factory(cfg, env={"GATEWAY_ACCESS_LOG": "false"})
    try:
        for gw in (on, off):
            r = httpx.get(gw.base_url + "/models", timeout=10)
            assert r.status_code == 200
        rec = wait_line(on, r_id := httpx.get(on.base_url + "/models").headers["x-request-id"])
        assert rec["request_id"] == r_id and rec["status"] == 200
        time.sleep(0.5)
        assert access_lines(off) == []
    finally:
        on.stop()
        off.stop()
