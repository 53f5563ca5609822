"""Running one pod of a multi-pod group (see engine/group.py for the roles and launchers)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.group import (
    GroupError,
    GroupInfoServer,
    GroupPlan,
    check_same_weights,
    manifest_digest,
    ray_command,
    wait_for_leader,
)
from engine.supervisor import Supervisor

log = logging.getLogger("engine.group")


def ray_executable(python: str) -> str:
    beside = Path(python).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def commands(s: Any, plan: GroupPlan, vllm_cmd: list[str], python: str) -> list[list[str]]:
    """What this pod runs, in order (for --dry-run and for the runner)."""
    if plan.launcher == "ray":
        node = ray_command(s, plan, ray_executable(python))
        return [node, vllm_cmd] if plan.role == "leader" else [node]
    return [vllm_cmd]


def _ray_nodes_alive(python: str, env: dict[str, str]) -> int:
    code = "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(1 for n in ray.nodes() if n['Alive']))"
    try:
        out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


def _wait_ray_nodes(
    plan: GroupPlan, head: subprocess.Popen[bytes], python: str, env: dict[str, str], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise GroupError(f"the Ray head exited with code {head.returncode} before the group formed")
        seen = _ray_nodes_alive(python, env)
        if seen >= plan.size:
            log.info("group: %d of %d Ray nodes joined", seen, plan.size)
            return
        time.sleep(2)
    raise GroupError(f"only {seen} of {plan.size} pods joined the Ray cluster within {timeout:.0f}s")


def run_group(
    s: Any, plan: GroupPlan, vllm_cmd: list[str], env: dict[str, str], model_dir: str, health_url: str
) -> int:
    """Run this pod's part of the group until it ends; the exit code of what it supervised."""
    python = s.python or sys.executable
    digest = manifest_digest(model_dir)
    info_server = None
    head: subprocess.Popen[bytes] | None = None
    try:
        if plan.role == "leader":
            bind = s.host if s.host else "0.0.0.0"
            info_server = GroupInfoServer(
                bind, s.group_port, {"digest": digest, "size": plan.size, "launcher": plan.launcher}
            )
            print(
                f"llm-engine: group leader of {plan.size} pods ({plan.launcher}), weights {str(digest)[:12]}",
                file=sys.stderr,
                flush=True,
            )
            if plan.launcher == "ray":
                node_cmd = commands(s, plan, vllm_cmd, python)[0]
                head = subprocess.Popen(node_cmd, env=env, start_new_session=True)
                _wait_ray_nodes(plan, head, python, env, s.group_join_timeout)
            sup = Supervisor(vllm_cmd, env, health_url, s.startup_timeout, s.drain_timeout)
            return sup.run()
        leader = wait_for_leader(plan, s.group_port, s.group_join_timeout)
        check_same_weights(leader, digest, plan)
        print(
            f"llm-engine: group worker {plan.index} of {plan.size} joining {plan.leader_address} "
            f"(weights {str(digest)[:12]} match the leader's)",
            file=sys.stderr,
            flush=True,
        )
        cmd = commands(s, plan, vllm_cmd, python)[0]
        return Supervisor(cmd, env, None, s.startup_timeout, s.drain_timeout).run()
    except GroupError as e:
        print(f"llm-engine: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if head is not None and head.poll() is None:
            try:
                os.killpg(head.pid, signal.SIGTERM)
                head.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(head.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if info_server is not None:
            info_server.shutdown()
