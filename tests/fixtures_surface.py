"""Fixtures for the OpenAI surface tests: the pooling engine (a tiny BERT embedding model built offline), a LoRA
adapter for the tiny generator in S3, and one gateway in front of both engines with adapters, audit and quotas."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Engine, sha256_hex

EMBED = "embed"
ADAPTER = "fin"
KEY_BASE_ONLY = "sk-test-base-model-only"


@pytest.fixture(scope="session")
def embed_model_dir(test_cache_dir: Path) -> Path:
    from engine.testmodel import build_embedding_model

    return build_embedding_model(test_cache_dir / "embed-seed0", seed=0)


@pytest.fixture(scope="session")
def lora_adapter_dir(test_cache_dir: Path, tiny_model_dir: Path) -> Path:
    from engine.testmodel import build_lora_adapter

    return build_lora_adapter(tiny_model_dir, test_cache_dir / "lora-fin-seed1", seed=1)


@pytest.fixture(scope="session")
def pool_engine_started(embed_model_dir: Path) -> Iterator[Engine]:
    """The pooling engine's process, started but not waited for (request it before ``engine`` so that both
    engines load at the same time)."""
    e = Engine(
        str(embed_model_dir),
        served_name=EMBED,
        extra_env={"ENGINE_MAX_MODEL_LEN": "512", "ENGINE_RUNNER": "pooling"},
    )
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="session")
def pool_engine(pool_engine_started: Engine) -> Engine:
    """A real vLLM CPU engine serving the embedding model (pooling runner: embeddings, score, rerank)."""
    return pool_engine_started.wait_ready()


@pytest.fixture(scope="session")
def lora_in_s3(s3_server, lora_adapter_dir: Path) -> str:
    """The adapter pushed to the session's S3 server (with its manifest); returns its s3:// URI."""
    from tests.fixtures_weights import run_engine_cli

    bucket = f"adapters-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(bucket)
    uri = f"s3://{bucket}/{ADAPTER}"
    r = run_engine_cli("push", str(lora_adapter_dir), uri, "--no-progress", env=s3_server.env())
    assert r.returncode == 0, r.stderr
    return uri


def surface_config(engine_url: str, pool_url: str, **extra: Any) -> dict[str, Any]:
    from tests.conftest import KEY_ALL, KEY_LIMITED, MODEL

    cfg: dict[str, Any] = {
        "models": [
            {"name": MODEL, "upstreams": [engine_url]},
            {"name": ADAPTER, "base": MODEL},
            {"name": EMBED, "upstreams": [pool_url]},
        ],
        "api_keys": [
            {"id": "all", "sha256": sha256_hex(KEY_ALL), "tenant": "team-a", "models": ["*"]},
            {
                "id": "limited",
                "sha256": sha256_hex(KEY_LIMITED),
                "tenant": "team-b",
                "models": ["other-model"],
            },
            {
                "id": "base-only",
                "sha256": sha256_hex(KEY_BASE_ONLY),
                "tenant": "team-c",
                "models": [MODEL, EMBED],
            },
        ],
        "health_interval": 0.5,
    }
    cfg.update(extra)
    return cfg
