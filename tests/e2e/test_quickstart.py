"""scripts/quickstart end to end: the README's SDK and curl examples against the stack it starts, a second run
reuses the running stack instead of starting another, a busy port names the variable to change, the engine
reports its start phases, and a real SIGHUP to quickstart's process group (a closed terminal) stops every
process of the stack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, free_port

PY = sys.executable
README = (REPO / "README.md").read_text()


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _env(state: Path, **ports: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "ENGINE_", "QUICKSTART_", "OPENAI_"))
    }
    env.update({"QUICKSTART_DIR": str(state), "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in ports.items()})
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_help_lists_every_variable_and_starts_nothing(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import quickstart

    env = _env(tmp_path / "qs")
    r = subprocess.run(
        [str(REPO / "scripts/quickstart"), "--help"], capture_output=True, text=True, env=env, timeout=30
    )
    assert r.returncode == 0 and r.stdout.startswith("usage: scripts/quickstart")
    for name, default, _ in quickstart.VARIABLES:
        assert re.search(rf"^  {name} .*\(default: {re.escape(default)}\)$", r.stdout, re.M), name
    # every variable the script reads is in the table
    read = set(re.findall(r"os\.environ\.get\(\"([A-Z_]+)\"", (REPO / "scripts/quickstart.py").read_text()))
    read |= set(quickstart.PORTS.values())
    assert read <= {n for n, _, _ in quickstart.VARIABLES}
    assert not (tmp_path / "qs").exists(), "--help must not start or create anything"


def test_busy_port_names_the_variable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        ports = {"QUICKSTART_PORT": free_port(), "QUICKSTART_ENGINE_PORT": busy}
        ports |= {"QUICKSTART_S3_PORT": free_port(), "QUICKSTART_METRICS_PORT": free_port(),
                  "QUICKSTART_GATEWAY_METRICS_PORT": free_port()}
        r = subprocess.run(
            [PY, str(REPO / "scripts/quickstart.py")],
            capture_output=True,
            text=True,
            env=_env(tmp_path / "qs", **ports),
            timeout=60,
        )
    assert r.returncode == 1 and r.stdout == ""
    assert f"port {busy} (engine) is in use" in r.stderr and "set QUICKSTART_ENGINE_PORT" in r.stderr


@pytest.mark.engine
def test_stack_serves_readme_examples_reuses_and_stops_on_sighup(tmp_path: Path) -> None:
    state = tmp_path / "qs"
    ports = {
        "QUICKSTART_PORT": free_port(),
        "QUICKSTART_ENGINE_PORT": free_port(),
        "QUICKSTART_S3_PORT": free_port(),
        "QUICKSTART_METRICS_PORT": free_port(),
        "QUICKSTART_GATEWAY_METRICS_PORT": free_port(),
    }
    env = _env(state, **ports)
    err = open(tmp_path / "quickstart.err", "wb")  # noqa: SIM115
    # its own session and process group, as in a terminal
    p = subprocess.Popen(
        [PY, str(REPO / "scripts/quickstart.py")],
        stdout=subprocess.PIPE,
        stderr=err,
        env=env,
        start_new_session=True,
        text=True,
    )
    pids: list[int] = []
    try:
        exports: dict[str, str] = {}
        deadline = time.monotonic() + 420
        while len(exports) < 2 and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            m = re.match(r"^export (OPENAI_BASE_URL|OPENAI_API_KEY)=(\S+)$", line.strip())
            if m:
                exports[m.group(1)] = m.group(2)
        assert len(exports) == 2, (tmp_path / "quickstart.err").read_text()[-3000:]
        assert exports["OPENAI_BASE_URL"] == f"http://127.0.0.1:{ports['QUICKSTART_PORT']}/v1"
        record = json.loads((state / "stack.json").read_text())
        pids = [c["pid"] for c in record["components"].values()]
        assert len(pids) == 3 and all(_alive(x) for x in pids)

        # the README's examples, as a user runs them after pasting the export lines
        user_env = {**env, **exports}
        sdk = next(b for b in readme_blocks("python") if "OpenAI()" in b)
        r = subprocess.run([PY, "-c", sdk], capture_output=True, text=True, env=user_env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "CompletionUsage(" in r.stdout
        curl = next(b for b in readme_blocks("bash") if "curl" in b)
        r = subprocess.run(
            ["bash", "-c", "set -e\n" + curl], capture_output=True, text=True, env=user_env, timeout=120
        )
        assert r.returncode == 0, r.stderr
        assert '"object":"chat.completion"' in r.stdout.replace(" ", "") and "data: [DONE]" in r.stdout

        # the engine reported its start phases with elapsed times
        engine_log = (state / "logs" / "engine.log").read_text()
        for phase in ("pulling s3://", "starting vLLM", "loading weights", "ready at"):
            assert re.search(rf"^llm-engine: \[ *[0-9.]+s\] {re.escape(phase)}", engine_log, re.M), phase

        # a second run finds the stack and reuses it: same lines, nothing new started
        r = subprocess.run(
            [PY, str(REPO / "scripts/quickstart.py")], capture_output=True, text=True, env=env, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert f"export OPENAI_BASE_URL={exports['OPENAI_BASE_URL']}" in r.stdout
        assert f"export OPENAI_API_KEY={exports['OPENAI_API_KEY']}" in r.stdout
        assert "reusing it" in r.stderr
        assert [
            c["pid"] for c in json.loads((state / "stack.json").read_text())["components"].values()
        ] == pids

        # the terminal closes: SIGHUP to the whole process group
        os.killpg(p.pid, signal.SIGHUP)
        assert p.wait(120) == 0
        deadline = time.monotonic() + 30
        while any(_alive(x) for x in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [x for x in pids if _alive(x)], "orphans left after SIGHUP"
        assert not (state / "stack.json").exists()
        assert "SIGHUP: stopping the stack" in (tmp_path / "quickstart.err").read_text()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(60)
        for x in pids:
            if _alive(x):
                os.killpg(x, signal.SIGKILL)
        err.close()
