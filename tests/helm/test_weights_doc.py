"""docs/weights.md's chart snippet does what it says: ENGINE_VERIFY_CACHE reaches the pod's pull step (the init
container that checks the cache before vLLM starts) and not `llm-engine run`, so the model is hashed once."""

from __future__ import annotations

import re

import yaml

from engine.settings import EngineSettings
from tests.helm.chart import env_of, pod_spec, render
from tests.support import REPO


def test_verify_cache_snippet_sets_the_pull_step_only() -> None:
    doc = (REPO / "docs" / "weights.md").read_text()
    snippet = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "ENGINE_VERIFY_CACHE" in b)
    values = yaml.safe_load(snippet)
    (engine,) = render(values).engines()
    spec = pod_spec(engine)
    (pull,) = [c for c in spec["initContainers"] if c["name"] == "pull"]
    assert pull["args"][0] == "pull" and env_of(pull)["ENGINE_VERIFY_CACHE"] == "full"
    run = spec["containers"][0]
    assert "ENGINE_VERIFY_CACHE" not in env_of(run)  # `run` keeps the cheap default (size)
    assert EngineSettings(model=values["models"][0]["source"]).verify_cache == "size"
