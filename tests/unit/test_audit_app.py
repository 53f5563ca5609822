"""The audit writer wired into create_app: every API request gets exactly one record (no engine needed)."""

from __future__ import annotations

import json
from pathlib import Path

from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.conftest import KEY_ALL, KEY_LIMITED, default_keys
from tests.support import free_port


def test_every_route_outcome_is_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    settings = GatewaySettings(
        models=[{"name": "tiny", "upstreams": [f"http://127.0.0.1:{free_port()}"]}],
        api_keys=default_keys(),
        health_interval=60,
        max_retries=0,
        audit={"enabled": True, "path": str(path), "fsync_interval": 0.05},
    )
    app = create_app(settings)
    all_h = {"authorization": f"Bearer {KEY_ALL}"}
    expected: list[tuple[str, int, str]] = []
    with TestClient(app) as c:

        def call(method: str, url: str, want: int, decision: str, **kw) -> None:
            rid = f"req-test-{len(expected)}"
            r = c.request(method, url, headers={"x-request-id": rid, **kw.pop("headers", {})}, **kw)
            assert r.status_code == want, (url, r.status_code, r.text)
            assert r.headers["x-request-id"] == rid
            expected.append((rid, want, decision))

        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        call("GET", "/v1/models", 200, "allowed", headers=all_h)
        call("GET", "/v1/models", 401, "unauthenticated")
        call("GET", "/v1/models/tiny", 200, "allowed", headers=all_h)
        call("GET", "/v1/models/nope", 404, "not_found", headers=all_h)
        call("POST", "/v1/chat/completions", 401, "unauthenticated", json=chat)
        call(
            "POST",
            "/v1/chat/completions",
            401,
            "unauthenticated",
            json=chat,
            headers={"authorization": "Bearer sk-wrong"},
        )
        call(
            "POST",
            "/v1/chat/completions",
            403,
            "forbidden",
            json=chat,
            headers={"authorization": f"Bearer {KEY_LIMITED}"},
        )
        call("POST", "/v1/chat/completions", 404, "not_found", json=dict(chat, model="nope"), headers=all_h)
        call("POST", "/v1/chat/completions", 400, "invalid_request", content=b"{not json", headers=all_h)
        call("GET", "/v1/nothing-here", 404, "not_found")
        # The only replica is down: the request was allowed but fails upstream.
        r = c.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "x"},
            headers={**all_h, "x-request-id": "req-up"},
        )
        assert r.status_code in (502, 503)
        expected.append(("req-up", r.status_code, "upstream_error"))
    # The app's shutdown drained the writer and closed the segment.
    (seg,) = tmp_path.glob("audit.*.jsonl")
    recs = [json.loads(x) for x in seg.read_text().splitlines()]
    got = [
        (r["http"]["request"]["id"], r["http"]["response"]["status_code"], r["llm"]["decision"])
        for r in recs
        if r["event"]["kind"] == "event"
    ]
    assert sorted(got) == sorted(expected)
    by_id = {r["http"]["request"]["id"]: r for r in recs if r["event"]["kind"] == "event"}
    assert (
        by_id["req-test-0"]["url"]["path"] == "/v1/models" and by_id["req-test-0"]["user"]["id"] is not None
    )
    assert by_id["req-test-6"]["organization"]["id"] == "team-b"
    assert by_id["req-test-9"]["url"]["path"] == "/v1/nothing-here"
    assert by_id["req-up"]["llm"]["model"] == "tiny"
    assert app.state.gateway.audit.queue_depth() == 0


def test_audit_off_by_default() -> None:
    app = create_app(GatewaySettings())
    assert app.state.gateway.audit is None
    assert all(type(o).__name__ != "AuditWriter" for o in app.state.gateway.observers)


def test_settings_from_env_and_yaml(tmp_path: Path, monkeypatch) -> None:
    import yaml

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "audit": {
                    "enabled": True,
                    "content": "redacted",
                    "redaction_patterns": [{"name": "mrn", "regex": "MRN-[0-9]+"}],
                }
            }
        )
    )
    monkeypatch.setenv("GATEWAY_CONFIG", str(cfg))
    monkeypatch.setenv("GATEWAY_AUDIT__ON_FULL", "reject")
    monkeypatch.setenv("GATEWAY_AUDIT__FSYNC_INTERVAL", "0.25")
    s = GatewaySettings()
    assert s.audit.enabled and s.audit.on_full == "reject" and s.audit.fsync_interval == 0.25
    assert s.audit.content == "redacted" and s.audit.redaction_patterns[0].name == "mrn"
    monkeypatch.setenv("GATEWAY_AUDIT__ON_FULL", "drop")
    import pydantic

    try:
        GatewaySettings()
    except pydantic.ValidationError as e:
        assert "on_full" in str(e)
    else:
        raise AssertionError("on_full=drop must be rejected: records are never dropped")
