"""Engine settings from ``ENGINE_*`` variables: one typed class, defaults that work on a laptop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENGINE_", extra="ignore")

    # A local directory or an s3://bucket/prefix URI (pulled and verified into cache_dir first).
    model: str = Field(..., description="local path or s3://bucket/prefix")
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    cache_dir: str = "~/.cache/llm-engine"
    # auto | cpu | cuda
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    # e.g. fp8; None = as the checkpoint says
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool | None = None
    # CUDA graphs on by default; eager only as an explicit opt-out (always eager on CPU).
    enforce_eager: bool = False
    # CPU build only: KV cache size (vLLM --kv-cache-memory-bytes), e.g. "64M" or "4G".
    cpu_kv_cache: str | None = "1G"
    # LoRA adapters: name=path-or-s3-uri, comma separated (pulled and verified like the model).
    lora_modules: str | None = None
    max_loras: int | None = None
    max_lora_rank: int | None = None
    # vLLM's own API key for its OpenAI server (the gateway sends it); from a Secret.
    api_key: str | None = None
    load_format: str | None = None
    seed: int | None = None
    # Any other vLLM argument, passed through verbatim (shell-quoted string).
    extra_args: str = ""
    # Seconds to wait for /health after start before giving up (model loads can be long).
    startup_timeout: float = 1800.0
    # Seconds vLLM gets to drain after SIGTERM before SIGKILL.
    drain_timeout: float = 60.0
    # Pull concurrency (parallel object downloads).
    pull_concurrency: int = Field(default=8, ge=1)
    # How a cached copy is checked before it is used: none, size (sizes + recorded mtimes), full (re-hash all).
    verify_cache: Literal["none", "size", "full"] = "size"
    # Fail when S3 cannot be reached, instead of starting from the last verified copy in the cache.
    require_source: bool = False
    # Python executable that runs vLLM (a different venv is possible).
    python: str | None = None
    # Our exporter (GPU via NVML, weight pulls) on its own port, beside vLLM's /metrics; 0 disables it.
    metrics_port: int = Field(default=9400, ge=0, le=65535)

    # --- Several pods per replica (engine/group.py). Unset = one pod; under a LeaderWorkerSet the role, size,
    # index and leader address come from LWS_* variables.
    group_role: Literal["auto", "single", "leader", "worker"] = Field(
        default="auto", description="place in a multi-pod group; auto: from LWS_WORKER_INDEX (0 = leader)"
    )
    group_size: int | None = Field(default=None, ge=1, description="pods in the group (default: LWS_GROUP_SIZE or 1)")
    group_index: int | None = Field(default=None, ge=0, description="this pod's index (default: LWS_WORKER_INDEX)")
    group_leader_address: str | None = Field(default=None, description="leader's address (default: LWS_LEADER_ADDRESS)")
    group_launcher: Literal["mp", "ray", "dp"] = Field(
        default="mp", description="mp: vLLM multi-node; ray: Ray cluster; dp: data (+expert) parallel ranks per pod"
    )
    group_port: int = Field(default=9410, ge=1, le=65535, description="leader's /group endpoint (weights digest)")
    group_master_port: int = Field(default=29501, ge=1, le=65535, description="mp launcher's rendezvous port")
    group_join_timeout: float = Field(default=1800.0, gt=0, description="seconds to wait for the leader / all workers")
    ray_port: int = Field(default=6379, ge=1, le=65535, description="Ray head's port (ray launcher)")
    gpus_per_pod: int | None = Field(default=None, ge=1, description="GPUs per pod, to check TP×PP fills the group")
    data_parallel_size: int = Field(default=1, ge=1, description="data-parallel ranks over the whole group")
    data_parallel_size_local: int | None = Field(default=None, ge=1, description="data-parallel ranks on this pod")
    data_parallel_rpc_port: int = Field(default=13345, ge=1, le=65535, description="dp launcher's RPC port")
    enable_expert_parallel: bool = Field(default=False, description="expert parallelism for MoE layers")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.lower()
        if v not in ("auto", "cpu", "cuda", "gpu"):
            raise ValueError("device must be auto, cpu or cuda")
        return "cuda" if v == "gpu" else v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        allowed = {"auto", "half", "float16", "bfloat16", "float", "float32"}
        if v not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)}")
        return v
