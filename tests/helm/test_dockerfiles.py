"""The images the chart runs agree with it: entrypoints are our console scripts, users are the uids the chart's
security contexts expect, and the engine image builds on the official vLLM image. (No Docker engine here: the
files are read, not built.)"""

from __future__ import annotations

import glob
import json
import re
import tomllib

from tests.helm.chart import chart
from tests.support import REPO


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (REPO / "docker" / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _last(instr: list[tuple[str, str]], op: str) -> str:
    return [r for o, r in instr if o == op][-1]


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _check_copies(instr: list[tuple[str, str]]) -> None:
    for op, rest in instr:
        if op == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for s in sources:
                assert "*" in s or glob.glob(str(REPO / s)), f"COPY source {s} does not exist"


def test_gateway_image() -> None:
    instr = _instructions("gateway.Dockerfile")
    _check_copies(instr)
    assert all("slim" in r for o, r in instr if o == "FROM")
    assert json.loads(_last(instr, "ENTRYPOINT")) == ["llm-gateway"] and "llm-gateway" in _scripts()
    user = _last(instr, "USER").split(":")[0]
    values = chart().values
    assert int(user) == values["gateway"]["podSecurityContext"]["runAsUser"] != 0
    env = " ".join(r for o, r in instr if o == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    # no extras: the gateway image must not pull torch/vLLM
    install = " ".join(r for o, r in instr if o == "RUN")
    assert not re.search(r"\.\[|engine-gpu|engine-cpu|vllm", install)


def test_engine_image() -> None:
    instr = _instructions("engine.Dockerfile")
    _check_copies(instr)
    assert _last(instr, "FROM").startswith("vllm/vllm-openai:")
    assert json.loads(_last(instr, "ENTRYPOINT")) == ["llm-engine"] and "llm-engine" in _scripts()
    user = _last(instr, "USER").split(":")[0]
    assert int(user) == chart().values["engine"]["podSecurityContext"]["runAsUser"] != 0
    assert int(chart().values["engine"]["port"]) == int(_last(instr, "EXPOSE"))
