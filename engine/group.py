"""One model replica spread over several pods (a *group*): who leads, who joins, and with which flags.

A group is one leader and ``size - 1`` workers that Kubernetes schedules and restarts together (a
LeaderWorkerSet). Only the leader serves HTTP; the gateway routes to leaders only. Three ways to launch it:

``mp``
    vLLM's own multi-node launch (no Ray): every pod runs vLLM with ``--nnodes``/``--node-rank`` and the
    leader's address; workers run ``--headless``. Tensor × pipeline parallelism spans the group.
``ray``
    The leader starts a Ray head and, once every worker's Ray node has joined, vLLM with
    ``--distributed-executor-backend ray``; workers run a Ray node that joins the leader's head.
``dp``
    Data parallel (+ expert parallel for MoE): each pod runs ``data_parallel_size_local`` engine ranks; the
    leader serves the API, workers run ``--headless`` with their ``--data-parallel-start-rank``.

Every pod pulls and verifies the same weights. The leader publishes the digest of the manifest it verified
(``GET /group`` on ``group_port``); a worker compares it with its own before joining and refuses, naming
both digests, when they differ (the object store changed between the two pulls).

Everything here is a pure function of the settings and the environment, except :class:`GroupInfoServer`
and :func:`wait_for_leader` (HTTP).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from engine.manifest import MANIFEST_NAME

Role = Literal["single", "leader", "worker"]

# Variables the LeaderWorkerSet controller sets in every container of a group.
LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"
LWS_GROUP_SIZE = "LWS_GROUP_SIZE"
LWS_WORKER_INDEX = "LWS_WORKER_INDEX"


class GroupError(ValueError):
    """A group that cannot work as configured; the message names the setting to change."""


@dataclass(frozen=True)
class GroupPlan:
    role: Role
    size: int
    index: int
    leader_address: str | None
    launcher: Literal["mp", "ray", "dp"]

    @property
    def is_group(self) -> bool:
        return self.role != "single"


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise GroupError(f"{name}={value!r} is not an integer") from None


def resolve_plan(s: Any, environ: Mapping[str, str]) -> GroupPlan:
    """The pod's place in its group, from ENGINE_GROUP_* settings, else from LeaderWorkerSet's variables."""
    size = s.group_size or _int(environ.get(LWS_GROUP_SIZE), LWS_GROUP_SIZE) or 1
    index = (
        s.group_index if s.group_index is not None else _int(environ.get(LWS_WORKER_INDEX), LWS_WORKER_INDEX)
    )
    leader = s.group_leader_address or environ.get(LWS_LEADER_ADDRESS) or None
    role: str = s.group_role
    if role == "auto":
        if size <= 1:
            role = "single"
        else:
            if index is None:
                raise GroupError(
                    f"group of {size} pods but this pod's index is unknown: set ENGINE_GROUP_INDEX or run under a "
                    f"LeaderWorkerSet ({LWS_WORKER_INDEX})"
                )
            role = "leader" if index == 0 else "worker"
    if role == "single":
        return GroupPlan("single", 1, 0, None, s.group_launcher)
    if size < 2:
        raise GroupError(
            f"ENGINE_GROUP_ROLE={role} needs ENGINE_GROUP_SIZE >= 2 (or {LWS_GROUP_SIZE}), got {size}"
        )
    if index is None:
        index = 0 if role == "leader" else None
    if index is None:
        raise GroupError(
            f"a worker needs its index in the group: set ENGINE_GROUP_INDEX (or {LWS_WORKER_INDEX})"
        )
    if role == "leader" and index != 0:
        raise GroupError(f"the leader has index 0, got ENGINE_GROUP_INDEX={index}")
    if role == "worker" and not 1 <= index < size:
        raise GroupError(f"a worker's index must be between 1 and {size - 1}, got {index}")
    if role == "worker" and not leader:
        raise GroupError(
            f"a worker needs the leader's address: set ENGINE_GROUP_LEADER_ADDRESS (or {LWS_LEADER_ADDRESS})"
        )
    if role == "leader" and not leader:
        leader = s.host if s.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return GroupPlan(role, size, index, leader, s.group_launcher)  # type: ignore[arg-type]


def check_layout(s: Any, plan: GroupPlan) -> None:
    """Parallelism must fill the group exactly: a mismatch would leave GPUs idle or hang at start."""
    if not plan.is_group:
        return
    if plan.launcher == "dp":
        if s.data_parallel_size < plan.size:
            raise GroupError(
                f"ENGINE_DATA_PARALLEL_SIZE={s.data_parallel_size} is smaller than the group ({plan.size} pods): "
                "each pod runs at least one data-parallel rank"
            )
        if s.data_parallel_size % plan.size:
            raise GroupError(
                f"ENGINE_DATA_PARALLEL_SIZE={s.data_parallel_size} does not divide evenly over {plan.size} pods"
            )
        return
    world = s.tensor_parallel_size * s.pipeline_parallel_size
    if s.gpus_per_pod and world != plan.size * s.gpus_per_pod:
        raise GroupError(
            f"tensor_parallel_size × pipeline_parallel_size = {world} but the group has {plan.size} pods × "
            f"{s.gpus_per_pod} GPUs = {plan.size * s.gpus_per_pod}: they must be equal"
        )
    if world < plan.size:
        raise GroupError(
            f"tensor_parallel_size × pipeline_parallel_size = {world} is smaller than the group ({plan.size} pods)"
        )


def dp_local_size(s: Any, plan: GroupPlan) -> int:
    return s.data_parallel_size_local or max(1, s.data_parallel_size // plan.size)


def group_vllm_args(s: Any, plan: GroupPlan) -> list[str]:
    """vLLM flags for this pod's role (appended to the single-replica command line)."""
    if not plan.is_group:
        if s.data_parallel_size > 1:
            dp = ["--data-parallel-size", str(s.data_parallel_size)]
            return dp + (["--enable-expert-parallel"] if s.enable_expert_parallel else [])
        return ["--enable-expert-parallel"] if s.enable_expert_parallel else []
    assert plan.leader_address is not None
    args: list[str] = []
    if plan.launcher == "mp":
        args += [
            "--distributed-executor-backend",
            "mp",
            "--nnodes",
            str(plan.size),
            "--node-rank",
            str(plan.index),
            "--master-addr",
            plan.leader_address,
            "--master-port",
            str(s.group_master_port),
        ]
        if plan.role == "worker":
            args.append("--headless")
    elif plan.launcher == "ray":
        # Only the leader runs vLLM; Ray places the workers' shards on the joined nodes.
        args += ["--distributed-executor-backend", "ray"]
    else:  # dp
        local = dp_local_size(s, plan)
        args += [
            "--data-parallel-size",
            str(s.data_parallel_size),
            "--data-parallel-size-local",
            str(local),
            "--data-parallel-address",
            plan.leader_address,
            "--data-parallel-rpc-port",
            str(s.data_parallel_rpc_port),
        ]
        if plan.role == "worker":
            args += ["--headless", "--data-parallel-start-rank", str(plan.index * local)]
    if s.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    return args


def ray_command(s: Any, plan: GroupPlan, ray_bin: str) -> list[str]:
    """The Ray node every pod of a ``ray`` group runs (the leader's is the head), in the foreground."""
    if plan.role == "leader":
        return [ray_bin, "start", "--head", f"--port={s.ray_port}", "--block", "--disable-usage-stats"]
    return [
        ray_bin,
        "start",
        f"--address={plan.leader_address}:{s.ray_port}",
        "--block",
        "--disable-usage-stats",
    ]


def manifest_digest(model_dir: str | os.PathLike[str]) -> str | None:
    """sha256 of the manifest the pull verified (None for a local directory without one)."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class GroupInfoServer:
    """The leader's ``GET /group``: the manifest digest it verified, for workers to compare before joining."""

    def __init__(self, host: str, port: int, info: dict[str, Any]) -> None:
        body = json.dumps(info).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.rstrip("/") != "/group":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True, name="group-info").start()

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for_leader(plan: GroupPlan, port: int, timeout: float, interval: float = 1.0) -> dict[str, Any]:
    """Poll the leader's ``/group`` until it answers (the leader may still be pulling); GroupError on timeout."""
    url = f"http://{plan.leader_address}:{port}/group"
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                info: dict[str, Any] = json.loads(r.read())
                return info
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
        time.sleep(interval)
    raise GroupError(f"the group leader did not answer at {url} within {timeout:.0f}s (last error: {last})")


def check_same_weights(leader_info: Mapping[str, Any], mine: str | None, plan: GroupPlan) -> None:
    theirs = leader_info.get("digest")
    if theirs != mine:
        raise GroupError(
            f"worker {plan.index} verified weights with manifest digest {str(mine)[:16]} but the leader at "
            f"{plan.leader_address} serves {str(theirs)[:16]}: the model changed in the object store between the "
            "two pulls; restart the group so every pod pulls the same version"
        )
    if leader_info.get("size") not in (None, plan.size):
        raise GroupError(
            f"the leader runs a group of {leader_info.get('size')} pods, this pod was told {plan.size}"
        )
