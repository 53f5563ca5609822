"""End to end: `llm-engine run` with ENGINE_MODEL=s3://... pulls the tiny model from a real S3 server, verifies it,
serves it with vLLM, and the gateway in front answers an OpenAI SDK chat completion with exact usage counts."""

from __future__ import annotations

import uuid

import pytest
from openai import OpenAI

from engine.manifest import MANIFEST_NAME
from tests.conftest import KEY_ALL, gateway_config
from tests.fixtures_weights import run_engine_cli
from tests.support import Engine

pytestmark = pytest.mark.engine


def test_engine_pulls_from_s3_and_serves_through_the_gateway(tmp_path, tiny_model_dir, s3_server, gateway_factory):
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    s3_server.client().make_bucket(bucket)
    uri = f"s3://{bucket}/test-models/tiny"
    r = run_engine_cli("push", str(tiny_model_dir), uri, "--no-progress", env=s3_server.env())
    assert r.returncode == 0, r.stderr

    cache = tmp_path / "engine-cache"
    engine = Engine(uri, served_name="tiny", extra_env={**s3_server.env(), "ENGINE_CACHE_DIR": str(cache)})
    try:
        engine.wait_ready(timeout=300)
        # The engine serves the verified copy from the cache, published under the manifest's digest.
        published = list((cache / "models").iterdir())
        assert len(published) == 1 and (published[0] / MANIFEST_NAME).is_file()
        assert "pull s3://" in engine.proc.log()
        for f in tiny_model_dir.iterdir():
            if f.is_file():
                assert (published[0] / f.name).read_bytes() == f.read_bytes()

        gw = gateway_factory(gateway_config([engine.url]))
        with OpenAI(base_url=gw.base_url, api_key=KEY_ALL, max_retries=0, timeout=120) as client:
            resp = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=7,
                extra_body={"ignore_eos": True},
            )
        assert resp.object == "chat.completion"
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.completion_tokens == 7
        assert resp.usage.prompt_tokens > 0
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    finally:
        engine.stop()


def test_engine_starts_from_its_verified_cache_while_s3_is_down(tmp_path, tiny_model_dir, gateway_factory):
    """A pod restart during an object-store outage: the weights were verified into the cache before (here by
    `llm-engine pull`, as the chart's init container does), S3 is stopped, and `llm-engine run` starts from the
    cached copy, says so in its log and on its exporter, and serves."""
    import httpx

    from tests.support import S3Server

    s3 = S3Server().wait_ready()
    engine = None
    try:
        s3.client().make_bucket("models")
        uri = "s3://models/tiny"
        assert run_engine_cli("push", str(tiny_model_dir), uri, "--no-progress", env=s3.env()).returncode == 0
        cache = tmp_path / "engine-cache"
        r = run_engine_cli("pull", uri, "--cache-dir", str(cache), "--no-progress", env=s3.env())
        assert r.returncode == 0, r.stderr
        s3.stop()

        engine = Engine(uri, served_name="tiny", extra_env={**s3.env(), "ENGINE_CACHE_DIR": str(cache)})
        engine.wait_ready(timeout=300)
        log = engine.proc.log()
        assert "S3 unreachable" in log and "using the last verified copy" in log
        exported = httpx.get(engine.metrics_url, timeout=5).text
        assert f'llm_engine_weights_source_unreachable{{source="{uri}"}} 1.0' in exported

        gw = gateway_factory(gateway_config([engine.url]))
        with OpenAI(base_url=gw.base_url, api_key=KEY_ALL, max_retries=0, timeout=120) as client:
            resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3, extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 3
    finally:
        if engine is not None:
            engine.stop()
        s3.stop()
