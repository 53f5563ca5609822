"""The images and docker/compose.yaml, for real: build the gateway and CPU engine images (rootful podman,
scripts/ctr), bring up S3 + engine (pulling verified weights) + gateway, get chat completions through the
gateway with the OpenAI SDK, check the containers run as non-root on a read-only root filesystem, tear down.

Slow (a cold image build downloads vLLM's CPU build and its dependencies: minutes), so it runs only when
asked: ``PRIVATE_LLM_CONTAINER_SMOKE=1`` (scripts/test sets up podman for it then)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support import REPO, free_port

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("PRIVATE_LLM_CONTAINER_SMOKE") != "1",
        reason="container smoke test: set PRIVATE_LLM_CONTAINER_SMOKE=1 (builds images with podman)",
    ),
    pytest.mark.engine,
]

CTR = str(REPO / "scripts" / "ctr")
COMPOSE = str(REPO / "docker" / "compose.yaml")
KEY = "sk-compose-demo-key"


def ctr(*args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True) -> str:
    r = subprocess.run(
        [CTR, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"scripts/ctr {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return r.stdout


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, str]]:
    ctr("build", "all", timeout=3600)
    ports = {
        "S3_PORT": str(free_port()),
        "ENGINE_PORT": str(free_port()),
        "ENGINE_METRICS_PORT": str(free_port()),
        "GATEWAY_PORT": str(free_port()),
    }
    project = f"pls-smoke-{uuid.uuid4().hex[:8]}"
    base = ["compose", "-p", project, "-f", COMPOSE]
    try:
        ctr(*base, "up", "-d", env=ports, timeout=300)
        url = f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                logs = ctr(*base, "logs", env=ports, check=False, timeout=60)
                raise AssertionError(f"the stack did not become ready:\n{logs[-6000:]}")
            time.sleep(2)
        yield {"url": url, "project": project, **ports}
    finally:
        ctr(*base, "down", "-v", "-t", "30", env=ports, check=False, timeout=300)


def test_chat_completion_through_the_composed_stack(stack: dict[str, str]) -> None:
    from openai import OpenAI

    with OpenAI(base_url=stack["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        r = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        assert r.choices[0].message.role == "assistant"
        assert r.usage is not None and r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
        chunks = list(
            client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    # a wrong key is refused in OpenAI's shape
    bad = httpx.get(stack["url"] + "/v1/models", headers={"authorization": "Bearer sk-wrong"}, timeout=10)
    assert bad.status_code == 401 and bad.json()["error"]["code"]


def test_containers_run_as_non_root_on_a_read_only_root(stack: dict[str, str]) -> None:
    ids = ctr("podman", "ps", "-q", "--filter", f"label=io.podman.compose.project={stack['project']}").split()
    assert len(ids) >= 3, "s3, engine and gateway are running"
    for info in json.loads(ctr("podman", "inspect", *ids)):
        name = info["Name"]
        assert info["HostConfig"]["ReadonlyRootfs"] is True, name
        pid = info["State"]["Pid"]
        status = open(f"/proc/{pid}/status").read()
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        assert uid != 0, f"{name} runs as root"
