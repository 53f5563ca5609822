"""Shared fixtures: a tiny model built offline, one real vLLM CPU engine per session, gateways in front."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, Engine, Gateway, sha256_hex

# API keys the default gateway knows (only their digests go into its config).
KEY_ALL = "sk-test-all-models"
KEY_LIMITED = "sk-test-other-model-only"
KEY_REVOKED = "sk-test-revoked"
MODEL = "tiny"


def default_keys() -> list[dict[str, Any]]:
    return [
        {"id": "all", "sha256": sha256_hex(KEY_ALL), "tenant": "team-a", "models": ["*"]},
        {"id": "limited", "sha256": sha256_hex(KEY_LIMITED), "tenant": "team-b", "models": ["other-model"]},
        {"id": "revoked", "sha256": sha256_hex(KEY_REVOKED), "tenant": "team-a", "disabled": True},
    ]


@pytest.fixture(scope="session")
def test_cache_dir() -> Path:
    d = Path(os.environ.get("LLM_TEST_CACHE", REPO / ".cache" / "tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(test_cache_dir: Path) -> Path:
    from engine.testmodel import build_test_model

    return build_test_model(test_cache_dir / "tiny-seed0", seed=0)


# The shared generator engine runs as the quickstart's demo engine does: OpenAI tools (hermes format; a named
# tool_choice decoded as JSON matching the tool's schema), JSON without free whitespace, the Responses store,
# and LoRA adapters loadable at run time (`llm-engine lora add`).
GENERATOR_ENV = {
    "ENGINE_ENABLE_AUTO_TOOL_CHOICE": "true",
    "ENGINE_TOOL_CALL_PARSER": "hermes",
    "ENGINE_TOOL_CALL_STRUCTURAL_TAGS": "false",
    "ENGINE_STRUCTURED_OUTPUTS_DISABLE_ANY_WHITESPACE": "true",
    "ENGINE_RESPONSES_STORE": "true",
    "ENGINE_ALLOW_RUNTIME_LORA": "true",
    "ENGINE_MAX_LORA_RANK": "8",
}


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """One real vLLM CPU engine serving the tiny model as 'tiny', shared by the whole session."""
    e = Engine(str(tiny_model_dir), served_name=MODEL, extra_env=GENERATOR_ENV)
    try:
        yield e.wait_ready()
    finally:
        e.stop()


@pytest.fixture(scope="session")
def gateway_factory() -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None, wait: bool = True) -> Gateway:
        g = Gateway(config, env=env)
        started.append(g)
        return g.wait_ready() if wait else g

    yield start
    for g in started:
        g.stop()


def gateway_config(upstreams: list[str], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "models": [{"name": MODEL, "upstreams": upstreams}],
        "api_keys": default_keys(),
        "health_interval": 0.5,
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="session")
def gateway(engine: Engine, gateway_factory) -> Gateway:
    """The default gateway in front of the session's engine."""
    return gateway_factory(gateway_config([engine.url]))


@pytest.fixture
def client(gateway: Gateway):
    from openai import OpenAI

    with OpenAI(base_url=gateway.base_url, api_key=KEY_ALL, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """A real S3 server on 127.0.0.1 for the whole session (use a fresh bucket per test)."""
    from tests.support import S3Server

    s = S3Server()
    try:
        yield s.wait_ready()
    finally:
        s.stop()
from tests.fixtures_auth import *  # noqa: F401,F403
from tests.fixtures_quota import *  # noqa: F401,F403
from tests.fixtures_routing import *  # noqa: F401,F403
from tests.fixtures_surface import *  # noqa: F401,F403
from tests.fixtures_weights import *  # noqa: F401,F403
