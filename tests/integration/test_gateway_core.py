"""The gateway core end to end: the official OpenAI SDK → our gateway (subprocess) → a real vLLM CPU engine."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import KEY_ALL, KEY_LIMITED, KEY_REVOKED, MODEL, gateway_config
from tests.support import PY, REPO, Proc, free_port, wait_http

pytestmark = pytest.mark.engine


def _err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _auth(key: str = KEY_ALL) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- the happy paths, through the OpenAI SDK --------------------------------------------------------------


def test_chat_completion_non_streamed(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_chat_completion_streamed_without_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=6,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    # The gateway asked vLLM for usage (to account), but this client did not: no usage chunk reaches it.
    assert all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    content_chunks = [c for c in chunks if c.choices[0].delta.content]
    assert 1 <= len(content_chunks) <= 6
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_streamed_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    u = usage_chunks[0]
    assert u.choices == [] and u is chunks[-1]
    assert u.usage.completion_tokens == 5 and u.usage.prompt_tokens > 0


def test_stream_is_relayed_chunk_by_chunk(gateway):
    """Tokens arrive as separate SSE events (not one buffered blob), ending with [DONE]."""
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 8, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    usage = [p for p in payloads if p.get("usage")]
    assert len(usage) == 1 and usage[0] is payloads[-1] and usage[0]["choices"] == []
    assert usage[0]["usage"]["completion_tokens"] == 8
    # One event per decoded piece of text: vLLM holds back a token that ends inside a UTF-8 sequence
    # (random weights emit such bytes), so up to 8 events, but never one blob.
    content = payloads[:-1]
    assert 2 <= len(content) <= 8


def test_completions_and_usage(client):
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens == 4


def test_models_list(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_unknown_parameters_pass_through(gateway):
    # `n`, `seed` and vLLM's own `min_tokens` are not read by the gateway; they must reach the engine.
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "n": 2, "seed": 7, "min_tokens": 3, "ignore_eos": True}
    r = httpx.post(gateway.url + "/v1/completions", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 200
    data = r.json()
    assert len(data["choices"]) == 2
    assert data["usage"]["completion_tokens"] == 6


def test_request_id_is_honoured(gateway):
    r = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 1},
        headers={**_auth(), "x-request-id": "my-trace-123"},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "my-trace-123"
    r = httpx.post(gateway.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=_auth(), timeout=10)
    assert r.headers["x-request-id"].startswith("req-")


def test_generate_compat_shim(gateway):
    r = httpx.post(gateway.url + "/generate", json={"prompt": "Hello", "max_tokens": 5}, headers=_auth(), timeout=60)
    assert r.status_code == 200
    data = r.json()
    assert isinstance(data["response"], str)
    assert data["usage"]["completion_tokens"] <= 5
    r = httpx.post(gateway.url + "/generate", json={"max_tokens": 5}, headers=_auth(), timeout=10)
    assert r.status_code == 400 and _err(r)["param"] == "prompt"


def test_health_and_readiness(gateway):
    assert httpx.get(gateway.url + "/healthz").status_code == 200
    r = httpx.get(gateway.url + "/readyz")
    # Without a credential: the status only, no model names.
    assert r.status_code == 200 and r.json() == {"status": "ready", "draining": False}
    r = httpx.get(gateway.url + "/readyz", headers=_auth())
    assert r.status_code == 200 and r.json()["models"] == {MODEL: True}
    # The models a key may use only; a wrong credential is a 401.
    assert httpx.get(gateway.url + "/readyz", headers=_auth(KEY_LIMITED)).json()["models"] == {}
    assert httpx.get(gateway.url + "/readyz", headers=_auth("sk-wrong")).status_code == 401


# -- errors: every one OpenAI-shaped with the right status ---------------------------------------------------


def test_missing_and_wrong_api_key(gateway):
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert r.status_code == 401 and _err(r)["type"] == "invalid_request_error"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": MODEL}, headers=_auth("sk-wrong"), timeout=10)
    assert r.status_code == 401 and _err(r)["code"] == "invalid_api_key"
    r = httpx.get(gateway.url + "/v1/models", headers=_auth(KEY_REVOKED), timeout=10)
    assert r.status_code == 401
    r = httpx.post(gateway.url + "/v1/completions", json={"model": MODEL}, headers={"authorization": "Basic abc"}, timeout=10)
    assert r.status_code == 401


def test_sdk_raises_authentication_error(gateway):
    from openai import OpenAI

    with OpenAI(base_url=gateway.base_url, api_key="sk-nope", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_model_access_is_per_key(gateway):
    r = httpx.post(gateway.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=_auth(KEY_LIMITED), timeout=10)
    assert r.status_code == 403 and _err(r)["code"] == "model_not_allowed"
    r = httpx.get(gateway.url + "/v1/models", headers=_auth(KEY_LIMITED), timeout=10)
    assert r.status_code == 200 and r.json()["data"] == []


@pytest.mark.parametrize(
    "payload, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": 42}', 400, "missing_model"),
        (b'{"model": "no-such-model", "messages": []}', 404, "model_not_found"),
        (b'{"model": "tiny", "messages": [], "stream": "yes"}', 400, "invalid_type"),
        (b'{"model": "tiny", "messages": [], "max_tokens": -1}', 400, "invalid_type"),
        (b'{"model": "tiny", "messages": [], "stream": true, "stream_options": 3}', 400, "invalid_type"),
    ],
)
def test_bad_requests(gateway, payload, status, code):
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        content=payload,
        headers={**_auth(), "content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == status
    assert _err(r)["code"] == code


def test_engine_validation_errors_come_back_openai_shaped(gateway):
    # vLLM rejects this (prompt too long for max_model_len=1024); the gateway passes the 400 on in OpenAI's shape.
    r = httpx.post(
        gateway.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 100000},
        headers=_auth(),
        timeout=30,
    )
    assert r.status_code == 400
    _err(r)


def test_embeddings_route_forwards(gateway):
    # The tiny model is a generator, so vLLM has no embeddings endpoint for it: the route forwards and the
    # client still gets an OpenAI-shaped error, not an HTML page or a stack trace.
    r = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers=_auth(), timeout=30)
    assert r.status_code in (400, 404)
    _err(r)
    r = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "hi", "stream": True}, headers=_auth(), timeout=30)
    assert r.status_code == 400


def test_body_over_limit_is_413(engine, gateway_factory):
    g = gateway_factory(gateway_config([engine.url]), env={"GATEWAY_MAX_BODY_BYTES": "1000"})
    big = {"model": MODEL, "prompt": "x" * 2000}
    r = httpx.post(g.url + "/v1/completions", json=big, headers=_auth(), timeout=10)
    assert r.status_code == 413 and _err(r)["code"] == "request_too_large"

    # Without Content-Length (chunked upload) the limit holds too.
    def gen():
        for _ in range(10):
            yield b"x" * 500

    r = httpx.post(g.url + "/v1/completions", content=gen(), headers=_auth(), timeout=10)
    assert r.status_code == 413


def test_unknown_route_and_method(gateway):
    r = httpx.get(gateway.url + "/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and _err(r)["code"] == "unknown_route"
    r = httpx.get(gateway.url + "/v1/chat/completions", headers=_auth(), timeout=10)
    assert r.status_code == 405
    _err(r)


def test_upstream_unreachable_is_502_or_503(gateway_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    g = gateway_factory(gateway_config([dead]))
    r = httpx.post(g.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=_auth(), timeout=10)
    assert r.status_code in (502, 503)
    err = _err(r)
    assert err["type"] in ("upstream_error", "service_unavailable")
    assert httpx.get(g.url + "/readyz").status_code == 503


@pytest.fixture
def sim_upstream():
    """A simulated upstream (fault injection only): returns a factory(mode) -> base URL."""
    procs = []

    def start(mode: str, **flags) -> str:
        port = free_port()
        cmd = [PY, str(REPO / "scripts" / "sim_upstream.py"), "--port", str(port), "--mode", mode]
        for k, v in flags.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        p = Proc(cmd, name=f"sim-{mode}")
        procs.append(p)
        wait_http(f"http://127.0.0.1:{port}/health", 20, p.proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.stop(timeout=3)


def test_upstream_timeout_is_504(gateway_factory, sim_upstream):
    url = sim_upstream("hang")
    cfg = gateway_config([url])
    cfg["models"][0]["timeouts"] = {"read": 1.0}
    g = gateway_factory(cfg)
    t0 = time.monotonic()
    r = httpx.post(g.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=_auth(), timeout=30)
    assert r.status_code == 504
    assert _err(r)["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 20


def test_upstream_500_is_passed_on_openai_shaped(gateway_factory, sim_upstream):
    g = gateway_factory(gateway_config([sim_upstream("error500")]))
    r = httpx.post(g.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=_auth(), timeout=30)
    assert r.status_code in (500, 502)
    _err(r)


def test_upstream_drop_mid_stream_ends_with_error_event(gateway_factory, sim_upstream):
    g = gateway_factory(gateway_config([sim_upstream("drop_mid_stream")]))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", g.url + "/v1/completions", json=body, headers=_auth(), timeout=30) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert "error" in last and last["error"]["message"]
    assert 1 <= len(lines) - 2 <= 3


# -- cancellation --------------------------------------------------------------------------------------------


def test_client_disconnect_cancels_upstream_request(engine, gateway):
    """A client that goes away mid-stream frees the engine's slot: vLLM's running count returns to 0."""
    max_tokens = 1000
    body = {"model": MODEL, "prompt": "start", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    generated_before = engine.metric("vllm:generation_tokens_total")
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", gateway.url + "/v1/completions", json=body, headers=_auth()) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            got = 0
            for line in it:
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
            running = engine.metric("vllm:num_requests_running")
            assert running >= 1
        # leaving the with-block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if engine.metric("vllm:num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert engine.metric("vllm:num_requests_running") == 0
    # The request was aborted, not run to completion: far fewer than max_tokens were generated for it.
    generated = engine.metric("vllm:generation_tokens_total") - generated_before
    assert 3 <= generated < max_tokens / 2


def test_readiness_all_models_or_any(engine, gateway_factory):
    """Plain /readyz needs every model served; ?require=any (Kubernetes readiness) needs one."""
    cfg = gateway_config([engine.url])
    cfg["models"].append({"name": "model-without-replicas", "upstreams": [f"http://127.0.0.1:{free_port()}"]})
    g = gateway_factory(cfg)
    r = httpx.get(g.url + "/readyz", headers=_auth(), timeout=10)
    assert r.status_code == 503 and r.json()["models"] == {MODEL: True, "model-without-replicas": False}
    assert httpx.get(g.url + "/readyz?require=any", timeout=10).status_code == 200
    r = httpx.get(g.url + "/readyz?require=most", timeout=10)
    assert r.status_code == 400 and _err(r)["param"] == "require"
    # The served model keeps working while the other has no replica.
    r = httpx.post(g.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, headers=_auth(), timeout=60)
    assert r.status_code == 200
