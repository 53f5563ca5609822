"""Pure parts of the hot path: usage extraction/stripping, prompt sizing, error normalization, settings."""

import json
import time

import pytest

from gateway.auth.apikeys import ApiKeyStore, digest
from gateway.context import RequestContext
from gateway.prompt import prompt_chars
from gateway.proxy.respond import normalize_error as _normalize_error
from gateway.proxy.sse import Usage, take_usage
from gateway.routing.pipeline import available, least_outstanding
from gateway.routing.pool import Endpoint, EndpointPool, parse_engine_metrics
from gateway.settings import ApiKeyConfig, GatewaySettings

CONTENT = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = (
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def ctx() -> RequestContext:
    return RequestContext("r1", "/v1/chat/completions")


def test_usage_chunk_is_recorded_and_stripped_when_client_did_not_ask():
    out, usage = take_usage(CONTENT + USAGE + DONE, hide=True)
    assert out == CONTENT + DONE
    assert usage == Usage(8, 3)


def test_usage_chunk_is_kept_byte_identical_when_client_asked():
    out, usage = take_usage(CONTENT + USAGE + DONE, hide=False)
    assert out == CONTENT + USAGE + DONE
    assert usage is not None and usage.prompt_tokens + usage.completion_tokens == 11


def test_continuous_usage_on_content_chunks_is_never_stripped():
    chunk = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":8,"completion_tokens":1,"total_tokens":9}}\n\n'
    out, usage = take_usage(chunk, hide=True)
    assert out == chunk
    assert usage is not None and usage.completion_tokens == 1


@pytest.mark.parametrize(
    "usage_event",
    [
        b'data: {"id": "c1", "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 3}}\n\n',
        b'data:{"id":"c1","choices":[],"usage" : {"prompt_tokens":8,"completion_tokens":3}}\n\n',
        b'event: message\ndata: {"choices":[],\n  "usage":{"prompt_tokens":8,"completion_tokens":3}}\n\n'.replace(
            b"\n  ", b" "
        ),
    ],
)
def test_usage_is_found_whatever_the_spacing(usage_event):
    out, usage = take_usage(CONTENT + usage_event + DONE, hide=True)
    assert usage == Usage(8, 3)
    assert out == CONTENT + DONE


def test_null_usage_is_not_usage():
    chunk = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'
    assert take_usage(chunk, hide=True) == (chunk, None)


def test_embeddings_usage_counts_total_minus_prompt_as_completion():
    out, usage = take_usage(
        b'data: {"choices":[],"usage":{"prompt_tokens":4,"total_tokens":4}}\n\n', hide=False
    )
    assert usage == Usage(4, 0)


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"messages": [{"role": "user", "content": "hello"}, {"role": "system", "content": "abc"}]}, 8),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "hey"}, {"type": "image_url"}]}
                ]
            },
            3,
        ),
        ({"prompt": "abcd"}, 4),
        ({"prompt": ["ab", "cde"]}, 5),
        ({"prompt": [1, 2, 3]}, 0),
        ({"prompt": [[1, 2, 3]]}, 12),
        ({"input": "embed me"}, 8),
        ({}, 0),
    ],
)
def test_prompt_chars(body, expected):
    assert prompt_chars(body) == expected


def test_error_normalization_keeps_openai_errors_and_wraps_others():
    good = json.dumps(
        {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}
    ).encode()
    assert _normalize_error(good, 400) == good
    wrapped = json.loads(_normalize_error(b'{"detail":"Not Found"}', 404))
    assert wrapped["error"]["message"] == "Not Found"
    html = json.loads(_normalize_error(b"<html>502 Bad Gateway</html>", 502))
    assert html["error"]["type"] == "upstream_error"
    assert json.loads(_normalize_error(b"", 500))["error"]["message"]


def test_api_key_store_matches_digest_and_ignores_disabled():
    store = ApiKeyStore(
        [
            ApiKeyConfig(id="a", sha256=digest("sk-a"), tenant="t1", models=["m1"]),
            ApiKeyConfig(id="b", sha256="sha256:" + digest("sk-b"), disabled=True),
        ]
    )
    p = store.lookup("sk-a")
    assert p is not None and p.key_id == "a" and p.tenant == "t1" and p.may_use("m1") and not p.may_use("m2")
    assert store.lookup("sk-b") is None
    assert store.lookup("sk-c") is None


def test_api_key_config_rejects_a_raw_key():
    with pytest.raises(ValueError):
        ApiKeyConfig(id="x", sha256="sk-this-is-not-a-digest")


def test_settings_from_yaml_and_env(tmp_path, monkeypatch):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("models:\n  - name: m\n    upstreams: ['http://a:1/']\nmax_body_bytes: 5\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(cfg))
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", "7")
    s = GatewaySettings()
    assert s.model("m").upstreams == ["http://a:1"]
    assert s.max_body_bytes == 7  # the environment wins over the file
    monkeypatch.setenv("GATEWAY_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError):
        GatewaySettings()


def test_least_outstanding_pick_skips_unhealthy_and_excluded():
    def pick(pool: EndpointPool, exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        return least_outstanding(available(pool.endpoints, time.monotonic(), exclude))

    pool = EndpointPool("m", [Endpoint("a", in_flight=3), Endpoint("b", in_flight=1), Endpoint("c", healthy=False)])
    assert pick(pool).url == "b"
    assert pick(pool, exclude=frozenset({"b"})).url == "a"
    pool.endpoints[1].engine_waiting = 5
    assert pick(pool).url == "a"
    assert pick(EndpointPool("m", [Endpoint("x", healthy=False)])) is None


def test_parse_engine_metrics_sums_label_sets():
    text = (
        b"# HELP vllm:num_requests_waiting x\n"
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        b'vllm:num_requests_waiting{engine="1",model_name="m"} 3.0\n'
        b'vllm:num_requests_running{engine="0"} 4.0\n'
        b"vllm:kv_cache_usage_perc 0.25\n"
        b'vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0\n'
    )
    assert parse_engine_metrics(text) == {"engine_waiting": 5.0, "engine_running": 4.0, "kv_cache_usage": 0.25}


def test_upstream_timeout_defaults_bound_a_hung_engine():
    import asyncio

    from gateway.settings import ModelConfig, UpstreamTimeouts
    from gateway.upstream import make_session

    cfg = ModelConfig(name="m", upstreams=["http://127.0.0.1:1"])
    t = cfg.timeouts
    assert (t.connect, t.first_byte_s, t.idle_s, t.total) == (5.0, 60.0, 30.0, 0.0)

    async def client_limits() -> tuple[float, float, float, int]:
        s = make_session(cfg)
        await s.close()
        return s.connect_timeout, s.acquire_timeout, s.keepalive, s.limit

    # the TCP connect alone, and waiting for a pooled connection plus connecting (pool + connect)
    assert asyncio.run(client_limits()) == (5.0, 35.0, 4.0, 1024)
    # the older single knob still sets both when they are not given; each explicit one wins
    legacy = UpstreamTimeouts(read=900)
    assert (legacy.first_byte_s, legacy.idle_s) == (900, 900)
    mixed = UpstreamTimeouts(read=900, idle=45)
    assert (mixed.first_byte_s, mixed.idle_s) == (900, 45)


@pytest.mark.parametrize("bad", [{"idle": 0}, {"first_byte": -1}, {"connect": 0}, {"total": -5}])
def test_upstream_timeouts_reject_nonsense(bad):
    from pydantic import ValidationError

    from gateway.settings import UpstreamTimeouts

    with pytest.raises(ValidationError):
        UpstreamTimeouts(**bad)
