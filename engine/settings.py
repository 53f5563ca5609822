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
