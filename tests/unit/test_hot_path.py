"""The hot path's cheap replacements behave like what they replace: ids stay unique (across forked workers
too), the garbage-collector tuning does what the setting says."""

from __future__ import annotations

import gc
import os

from gateway.context import new_request_id, unique_id
from gateway.serve import tune_gc
from gateway.settings import GatewaySettings


def test_request_ids_keep_their_shape_and_never_repeat() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for rid in ids[:3]:
        assert rid.startswith("req-") and len(rid) == 28
        int(rid[4:], 16)
    leases = [unique_id() for _ in range(10_000)]
    assert len(set(leases)) == len(leases)
    assert not set(leases) & {rid[4:] for rid in ids}


def test_a_forked_worker_draws_its_own_ids() -> None:
    parent = [new_request_id() for _ in range(3)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then exit at once
        try:
            os.write(w, " ".join([new_request_id(), unique_id()]).encode())
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 1024).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 2
    # Another random prefix: no collision with the parent's ids, past or future.
    assert child[0][4:16] != parent[0][4:16]
    assert child[0] not in parent + [new_request_id() for _ in range(3)]


def test_gc_tuning_follows_the_setting() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(0)
        assert gc.get_threshold() == before
        tune_gc(12_345)
        assert gc.get_threshold()[0] == 12_345
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert GatewaySettings().gc_young_threshold == 10_000


def test_a_proxied_route_that_fails_unexpectedly_answers_an_openai_500() -> None:
    """The proxied routes skip Starlette's router; an error escaping one still gets Starlette's treatment."""
    from starlette.testclient import TestClient

    from gateway.app import GatewayApp, create_app

    app = create_app(GatewaySettings(models=[{"name": "tiny", "upstreams": ["http://127.0.0.1:9"]}]))
    assert isinstance(app, GatewayApp) and "/v1/chat/completions" in app.direct_routes

    async def broken(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    app.direct_routes["/v1/chat/completions"] = broken  # type: ignore[assignment]
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        # Every other path still goes through Starlette: its 404 handler, in OpenAI's shape.
        r = c.post("/v1/chat/completions/", json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"


def test_audit_lines_are_the_json_they_were() -> None:
    """Same bytes as json.dumps(ensure_ascii=False, compact) for what records hold; a lone surrogate (JSON
    "\\ud800" in a client-chosen field) still gives a valid line instead of an exception in the writer."""
    import json

    from gateway.audit.record import dumps

    rec = {"a": 'é\u2028\x00"\\/', "n": [1, 2.5, -0.0, True, None, 10**20], "d": {"k": {}}, "e": []}
    assert dumps(rec) == json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode()
    assert dumps({1: "int key"}) == b'{"1":"int key"}'
    line = dumps({"model": "\ud800x"})
    assert json.loads(line) == {"model": "\ud800x"}
