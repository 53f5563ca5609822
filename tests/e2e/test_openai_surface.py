"""The OpenAI surface end to end with the OpenAI SDK: a real gateway in front of two real vLLM CPU engines (the
session's tiny generator with tools, structured output, the Responses store and run-time LoRA; a tiny BERT
embedding model as a pooling engine). Random weights: assertions are on structure, counts and usage, never text.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import KEY_ALL, KEY_LIMITED, MODEL
from tests.fixtures_surface import ADAPTER, EMBED, KEY_BASE_ONLY, surface_config

# Setup starts two engines (they load in parallel; slow on a busy 2-core box).
pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

KEY_TINY_TPM = "sk-test-tiny-token-budget"


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("surface-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def gw(pool_engine_started, engine, pool_engine, gateway_factory, audit_path: Path):
    from tests.support import sha256_hex

    cfg = surface_config(
        engine.url,
        pool_engine.url,
        audit={"enabled": True, "path": str(audit_path), "fsync_interval": 0.05, "content": "hash"},
        quota={
            "default": {"rpm": 100000, "tpm": 10_000_000},
            "principals": {"tiny-budget": {"tpm": 40}},
        },
        max_audio_bytes=64 * 1024,
    )
    cfg["api_keys"].append(
        {"id": "tiny-budget", "sha256": sha256_hex(KEY_TINY_TPM), "tenant": "team-d", "models": ["*"]}
    )
    g = gateway_factory(cfg)
    # The gateway learns what each engine serves with its health probes: wait for the first catalog.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(g.url + "/v1/models", headers={"authorization": f"Bearer {KEY_ALL}"})
        if {m["id"]: m for m in r.json()["data"]}.get(MODEL, {}).get("max_model_len"):
            break
        time.sleep(0.3)
    return g


@pytest.fixture
def sdk(gw):
    with OpenAI(base_url=gw.base_url, api_key=KEY_ALL, max_retries=0, timeout=120) as c:
        yield c


def audit_records(path: Path, request_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in sorted(path.parent.glob("audit*.jsonl")):
            for line in p.read_text().splitlines():
                rec = json.loads(line)
                # the client's X-Request-Id is recorded as http.request.id (event.id is the gateway's own)
                if rec.get("http", {}).get("request", {}).get("id") == request_id:
                    return rec
        time.sleep(0.1)
    raise AssertionError(f"no audit record for {request_id}")


def post(gw, path: str, body: Any, key: str = KEY_ALL, **kw) -> httpx.Response:
    return httpx.post(
        gw.url + path,
        json=body,
        headers={"authorization": f"Bearer {key}", **kw.pop("headers", {})},
        timeout=120,
        **kw,
    )


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


# -- structured output and tools through chat completions ---------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def validate_person(obj: Any) -> None:
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "tags"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 24
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b", "c"}


def test_json_schema_output_parses_and_validates(sdk):
    for _ in range(2):
        r = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a person as JSON"}],
            max_tokens=200,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
        )
        assert r.choices[0].finish_reason == "stop", "the bounded schema must close within max_tokens"
        validate_person(json.loads(r.choices[0].message.content))
        assert r.usage.completion_tokens > 0


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather for a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


def test_forced_tool_call_returns_parseable_arguments(sdk):
    r = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        max_tokens=200,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = r.choices[0].message.tool_calls
    assert calls, f"no tool call: {r.choices[0].message.content!r:.300} ({r.choices[0].finish_reason})"
    assert (
        calls and len(calls) == 1 and calls[0].type == "function" and calls[0].function.name == "get_weather"
    )
    args = json.loads(calls[0].function.arguments)
    assert set(args) == {"city", "days"} and isinstance(args["city"], str) and 1 <= args["days"] <= 7
    assert r.usage.completion_tokens > 0


# -- Responses API ------------------------------------------------------------------------------------------


def test_responses_create_retrieve_and_audit(gw, engine, sdk, audit_path):
    raw = sdk.responses.with_raw_response.create(
        model=MODEL, input="hello", max_output_tokens=6, extra_headers={"x-request-id": "req-resp-plain"}
    )
    resp = raw.parse()
    assert resp.object == "response" and resp.id.startswith("resp")
    assert resp.usage.input_tokens > 0 and 0 < resp.usage.output_tokens <= 6
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    rec = audit_records(audit_path, "req-resp-plain")
    assert rec["url"]["path"] == "/v1/responses" and rec["llm"]["model"] == MODEL
    assert rec["llm"]["usage"]["prompt_tokens"] == resp.usage.input_tokens
    assert rec["llm"]["usage"]["completion_tokens"] == resp.usage.output_tokens
    assert len(rec["llm"]["prompt"]["sha256"]) == 64  # content policy applied to the route's text fields

    # The stored response is read back from the replica that holds it, by the caller who made it.
    got = sdk.responses.retrieve(resp.id)
    assert got.id == resp.id and got.usage.output_tokens == resp.usage.output_tokens
    with OpenAI(base_url=gw.base_url, api_key=KEY_BASE_ONLY, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_doesnotexist0000")
    # Cancel goes to the same replica (the engine answers: a finished response cannot be cancelled, or it is
    # returned as it is); the gateway's own "not found" is not what comes back.
    r = httpx.post(
        f"{gw.base_url}/responses/{resp.id}/cancel",
        headers={"authorization": f"Bearer {KEY_ALL}", "x-request-id": "req-resp-cancel"},
        timeout=60,
    )
    assert r.status_code == 200 or r.json()["error"].get("code") != "response_not_found", r.text
    assert audit_records(audit_path, "req-resp-cancel")["llm"]["upstream"] == engine.url
    # Metrics carry the route pattern, never the id.
    from tests.fixtures_routing import gateway_metric

    assert gateway_metric(gw, "llm_gateway_requests_total", route="/v1/responses/{id}", model=MODEL) >= 1
    assert gateway_metric(gw, "llm_gateway_requests_total", route="/v1/responses", model=MODEL) >= 1


def test_responses_stream_typed_events_and_settled_usage(gw, sdk, audit_path):
    stream = sdk.responses.create(
        model=MODEL,
        input="count",
        max_output_tokens=5,
        stream=True,
        extra_headers={"x-request-id": "req-resp-stream"},
    )
    types, final = [], None
    for ev in stream:
        types.append(ev.type)
        if ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in types
    assert final is not None and final.usage.output_tokens > 0
    rec = audit_records(audit_path, "req-resp-stream")
    assert rec["llm"]["stream"] is True and rec["event"]["outcome"] == "success"
    assert rec["llm"]["usage"]["completion_tokens"] == final.usage.output_tokens
    assert rec["llm"]["usage"]["prompt_tokens"] == final.usage.input_tokens


# -- embeddings, score, rerank ------------------------------------------------------------------------------


def test_embeddings_dims_batch_base64_and_usage(sdk, audit_path):
    raw = sdk.embeddings.with_raw_response.create(
        model=EMBED, input=["hello world", "a second text", "3"], extra_headers={"x-request-id": "req-emb"}
    )
    r = raw.parse()
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(d.embedding) == 128 for d in r.data)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens
    rec = audit_records(audit_path, "req-emb")
    assert rec["llm"]["usage"]["prompt_tokens"] == r.usage.prompt_tokens and rec["llm"]["model"] == EMBED

    assert len(sdk.embeddings.create(model=EMBED, input="x", dimensions=64).data[0].embedding) == 64
    # base64 (the SDK decodes it itself; ask for the raw form to check the wire format)
    b64 = sdk.embeddings.with_raw_response.create(model=EMBED, input="hello", encoding_format="base64")
    blob = json.loads(b64.text)["data"][0]["embedding"]
    floats = struct.unpack(f"<{len(base64.b64decode(blob)) // 4}f", base64.b64decode(blob))
    assert len(floats) == 128


def test_rerank_and_score_on_the_pooling_engine(gw):
    docs = ["the cat sat", "stock prices rose", "a dog barked"]
    for path in ("/v1/rerank", "/rerank"):
        r = post(gw, path, {"model": EMBED, "query": "animals", "documents": docs, "top_n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["results"]) == 2 and {x["index"] for x in body["results"]} <= {0, 1, 2}
        assert body["usage"]["total_tokens"] > 0
    for path in ("/v1/score", "/score"):
        r = post(gw, path, {"model": EMBED, "text_1": "animals", "text_2": docs})
        assert r.status_code == 200, r.text
        assert [d["index"] for d in r.json()["data"]] == [0, 1, 2]
    # the generator's engine serves none of these: refused in OpenAI's shape, never forwarded blindly
    err = assert_openai_error(post(gw, "/v1/rerank", {"model": MODEL, "query": "q", "documents": ["d"]}), 400)
    assert err["code"] == "unsupported_route" and err["param"] == "model"
    assert_openai_error(post(gw, "/v1/embeddings", {"model": MODEL, "input": "x"}), 400)
    assert_openai_error(post(gw, "/v1/responses", {"model": EMBED, "input": "x"}), 400)


# -- tokenizer routes ---------------------------------------------------------------------------------------


def test_tokenize_detokenize_are_authorized_but_not_counted(gw, audit_path):
    r = post(gw, "/tokenize", {"model": MODEL, "prompt": "hello world"}, headers={"x-request-id": "req-tok"})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert r.json()["count"] == len(tokens) > 0
    d = post(gw, "/detokenize", {"model": MODEL, "tokens": tokens})
    assert d.status_code == 200 and isinstance(d.json()["prompt"], str)
    rec = audit_records(audit_path, "req-tok")
    assert rec["llm"]["usage"]["total_tokens"] in (None, 0)
    assert_openai_error(post(gw, "/tokenize", {"model": MODEL, "prompt": "x"}, key=KEY_LIMITED), 403)
    # A principal with a 40 tokens/min budget: generation is refused, tokenizing a long text is not.
    long_text = "tokenize me " * 200
    for _ in range(3):
        assert (
            post(gw, "/tokenize", {"model": MODEL, "prompt": long_text}, key=KEY_TINY_TPM).status_code == 200
        )
    assert_openai_error(
        post(
            gw,
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 50},
            key=KEY_TINY_TPM,
        ),
        429,
    )


# -- /v1/models and LoRA adapters ---------------------------------------------------------------------------


def models_of(gw, key: str) -> dict[str, dict[str, Any]]:
    with OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as c:
        return {m.id: m.model_dump() for m in c.models.list().data}


def wait_listed(gw, name: str, present: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (name in models_of(gw, KEY_ALL)) == present:
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} {'not listed' if present else 'still listed'} after {timeout}s")


def test_models_carry_engine_fields(gw):
    ms = models_of(gw, KEY_ALL)
    assert ms[MODEL]["max_model_len"] == 1024 and ms[EMBED]["max_model_len"] == 512
    assert ms[MODEL]["owned_by"] and isinstance(ms[MODEL]["created"], int)
    assert "root" not in ms[MODEL]  # the engine's disk path stays private
    assert set(models_of(gw, KEY_BASE_ONLY)) == {MODEL, EMBED}
    assert models_of(gw, KEY_LIMITED) == {}


def test_lora_adapter_added_served_and_removed_at_run_time(
    gw, engine, sdk, lora_in_s3, s3_server, tmp_path, audit_path
):
    import subprocess

    from tests.fixtures_weights import cli_env
    from tests.support import PY, REPO

    def lora(*args: str) -> subprocess.CompletedProcess:
        env = cli_env({**s3_server.env(), "ENGINE_CACHE_DIR": str(tmp_path / "cache")})
        return subprocess.run(
            [PY, "-m", "engine", "lora", *args, "--url", engine.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=str(REPO),
        )

    # Not loaded yet: not advertised, and the engine's own 404 comes back in OpenAI's shape.
    assert ADAPTER not in models_of(gw, KEY_ALL)
    r = lora("add", ADAPTER, lora_in_s3)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache").is_dir()  # pulled and verified into the cache first
    wait_listed(gw, ADAPTER, True)
    listed = models_of(gw, KEY_ALL)[ADAPTER]
    assert listed["parent"] == MODEL
    assert ADAPTER not in models_of(gw, KEY_BASE_ONLY)  # listed only for callers who may use it

    c = sdk.chat.completions.with_raw_response.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        extra_headers={"x-request-id": "req-lora"},
    )
    out = c.parse()
    assert out.model == ADAPTER and out.usage.completion_tokens > 0
    rec = audit_records(audit_path, "req-lora")
    assert rec["llm"]["model"] == ADAPTER and rec["llm"]["upstream"] == engine.url
    with OpenAI(base_url=gw.base_url, api_key=KEY_BASE_ONLY, max_retries=0) as other:
        with pytest.raises(openai.PermissionDeniedError):
            other.chat.completions.create(
                model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert other.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        ).usage

    r = lora("list")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["name"] == ADAPTER
    r = lora("remove", ADAPTER)
    assert r.returncode == 0, r.stderr
    wait_listed(gw, ADAPTER, False)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


# -- audio (no speech engine here): routing, authorization, limits and error shapes -------------------------


def multipart(fields: dict[str, str], file: bytes | None) -> tuple[bytes, str]:
    b = "surfaceboundary"
    out = b""
    for k, v in fields.items():
        out += f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    if file is not None:
        out += f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'.encode()
        out += file + b"\r\n"
    return out + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def test_audio_routes_check_the_form_before_any_engine(gw):
    def send(path: str, fields: dict[str, str], file: bytes | None, key: str = KEY_ALL) -> httpx.Response:
        body, ct = multipart(fields, file)
        return httpx.post(
            gw.url + path,
            content=body,
            headers={"authorization": f"Bearer {key}", "content-type": ct},
            timeout=30,
        )

    wav = b"RIFF" + b"\x00" * 2000
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        assert assert_openai_error(send(path, {"model": MODEL}, None), 400)["param"] == "file"
        assert assert_openai_error(send(path, {}, wav), 400)["param"] == "model"
        assert_openai_error(send(path, {"model": "no-such"}, wav), 404)
        assert_openai_error(send(path, {"model": MODEL}, wav, key=KEY_LIMITED), 403)
        assert_openai_error(send(path, {"model": MODEL}, b"\x00" * (65 * 1024)), 413)  # the audio size limit
        # the generator's engine has no speech route: refused, not advertised
        assert assert_openai_error(send(path, {"model": MODEL}, wav), 400)["code"] == "unsupported_route"
    with OpenAI(base_url=gw.base_url, api_key=KEY_ALL, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError):
            c.audio.transcriptions.create(model=MODEL, file=("a.wav", wav, "audio/wav"))
    r = httpx.post(
        gw.url + "/v1/audio/transcriptions",
        json={"model": MODEL},
        headers={"authorization": f"Bearer {KEY_ALL}"},
    )
    assert assert_openai_error(r, 400)["code"] == "invalid_content_type"


def test_unknown_route_is_an_openai_404(gw):
    err = assert_openai_error(post(gw, "/v1/assistants", {"model": MODEL}), 404)
    assert err["code"] == "unknown_route"
