"""The OpenAI surface's pure parts: the route table, multipart form reading, Responses stream scanning and the
response index, the engine catalog's parsing and merging. No network."""

from __future__ import annotations

import json

import pytest

from gateway.errors import ApiError
from gateway.multipart import parse_form
from gateway.responses_api import ResponseIndex, ResponsesStream
from gateway.routes import (
    EMBEDDINGS,
    PROXIED_ROUTES,
    RESPONSES,
    RESPONSES_GET,
    ROUTES_BY_NAME,
    TOKENIZE,
    route_texts,
    usage_tokens,
)
from gateway.routing.catalog import EngineCatalog, merged, parse_models, parse_paths
from gateway.routing.pool import Endpoint


def form(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_route_table_names_are_unique_and_bounded():
    names = [r.route_name for r in PROXIED_ROUTES]
    assert len(names) == len(set(names))
    assert all("{" not in r.route_name or r.model_from == "affinity" for r in PROXIED_ROUTES)
    assert ROUTES_BY_NAME["/v1/responses/{id}"] is RESPONSES_GET
    assert RESPONSES_GET.upstream_url_path({"response_id": "resp_1"}) == "/v1/responses/resp_1"


def test_what_each_route_reserves_and_settles():
    assert RESPONSES.reserves_completion and not EMBEDDINGS.reserves_completion and EMBEDDINGS.counts_tokens
    assert not TOKENIZE.counts_tokens and not TOKENIZE.reserves_completion
    assert usage_tokens("responses", {"input_tokens": 8, "output_tokens": 4, "total_tokens": 12}) == (8, 4)
    assert usage_tokens("prompt_only", {"prompt_tokens": 16, "total_tokens": 16}) == (16, 0)
    assert usage_tokens("chat", {"prompt_tokens": 3, "total_tokens": 10}) == (3, 7)
    assert usage_tokens("none", {"prompt_tokens": 3}) == (None, None)
    assert usage_tokens("chat", None) == (None, None)


def test_route_texts_follow_the_routes_fields():
    body = {
        "instructions": "be brief",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
    }
    assert route_texts(RESPONSES, body) == [
        {"role": "instructions", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert route_texts(ROUTES_BY_NAME["/v1/rerank"], {"query": "q", "documents": ["a", {"text": "b"}]}) == [
        {"role": "query", "content": "q"},
        {"role": "documents", "content": "a"},
        {"role": "documents", "content": "b"},
    ]
    assert route_texts(EMBEDDINGS, {"input": [[1, 2, 3]]}) == []


def test_multipart_fields_and_files_are_read_without_copying_files():
    body, ct = form(
        [
            ("file", "a.wav", b"RIFF\x00\x01" * 100),
            ("model", None, b"whisper"),
            ("prompt", None, "h\xe9".encode()),
        ]
    )
    f = parse_form(body, ct)
    assert f.fields == {"model": "whisper", "prompt": "h\xe9"}
    assert f.files == {"file": 600}
    body, ct = form([("model", None, b"w")], boundary='"quoted-b"'.strip('"'))
    assert parse_form(body, ct).files == {}


@pytest.mark.parametrize(
    "body, ct, code",
    [
        (b'{"model": "x"}', "application/json", "invalid_content_type"),
        (b"--a\r\n", "multipart/form-data", "invalid_content_type"),
        (b"no boundary here", "multipart/form-data; boundary=zz", "invalid_multipart"),
        (
            b'--zz\r\nContent-Disposition: form-data; name="model"\r\n\r\nw',
            "multipart/form-data; boundary=zz",
            "invalid_multipart",
        ),
    ],
)
def test_malformed_multipart_is_a_400_naming_it(body, ct, code):
    with pytest.raises(ApiError) as e:
        parse_form(body, ct)
    assert e.value.status == 400 and e.value.code == code


def _event(obj: dict) -> bytes:
    return f"event: {obj['type']}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def test_responses_stream_yields_id_usage_and_end():
    s = ResponsesStream()
    s.feed(
        _event(
            {"type": "response.created", "response": {"id": "resp_1", "object": "response", "usage": None}}
        )
    )
    s.feed(_event({"type": "response.output_text.delta", "delta": "response.completed"}))
    assert s.response_id == "resp_1" and s.terminal is None
    usage = {"input_tokens": 8, "output_tokens": 4, "total_tokens": 12}
    s.feed(
        _event(
            {"type": "response.completed", "response": {"id": "resp_1", "object": "response", "usage": usage}}
        )
    )
    assert s.terminal == "response.completed" and s.usage == usage


def test_response_index_is_bounded_and_remembers_the_creator():
    idx = ResponseIndex(capacity=2)
    idx.record("a", "m", "http://e1", "k1")
    idx.record("b", "m", "http://e2", "k2")
    idx.record("c", "m", "http://e1", "k1")
    assert idx.lookup("a") is None and len(idx) == 2
    assert idx.lookup("b").endpoint == "http://e2" and idx.lookup("c").principal == "k1"


def test_engine_catalog_parsing_and_merge_prefer_healthy_replicas():
    models = parse_models(
        b'{"data": [{"id": "tiny", "max_model_len": 1024, "root": "/secret/path", "parent": null, "created": 1},'
        b' {"id": "fin", "parent": "tiny", "max_model_len": null}]}'
    )
    assert models == {
        "tiny": {"max_model_len": 1024, "parent": None, "created": 1},
        "fin": {"parent": "tiny", "max_model_len": None},
    }
    assert parse_paths(b'{"paths": {"/v1/embeddings": {}, "/tokenize": {}}}') == {
        "/v1/embeddings",
        "/tokenize",
    }
    assert parse_models(b"not json") is None and parse_paths(b"[]") is None
    a, b = Endpoint("http://a"), Endpoint("http://b", healthy=False)
    a.catalog = EngineCatalog(models={"tiny": {}}, paths=frozenset({"/v1/chat/completions"}))
    b.catalog = EngineCatalog(models={"tiny": {}, "fin": {}}, paths=frozenset({"/v1/responses"}))
    view = merged([a, b])
    assert view.serves_path("/v1/chat/completions") and not view.serves_path("/v1/responses")
    assert view.serves_model("fin") is False
    assert merged([Endpoint("http://c")]).serves_path("/v1/embeddings") is None  # unknown: forwarded
