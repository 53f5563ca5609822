"""Engine settings from ``ENGINE_*`` variables: one typed class, defaults that work on a laptop.

Each setting's one-line meaning (``llm-engine run --help``, ``llm-engine config check``) is the comment right
above it. A variable that starts with ``ENGINE_`` but names no setting stops start-up.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from configkit import ConfigError, check_environment, one_line


class _EnvCheck(PydanticBaseSettingsSource):
    """Refuses ENGINE_* variables that name no setting (a typo would otherwise be dropped silently)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        check_environment(EngineSettings, os.environ, "ENGINE_", None)
        return {}


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENGINE_", extra="forbid")

    # A local directory or an s3://bucket/prefix URI (pulled and verified into cache_dir first).
    model: str = Field(..., description="local path or s3://bucket/prefix")
    # The model name clients (the gateway) send; default: the last part of the model's path.
    served_model_name: str | None = None
    # Address vLLM listens on.
    host: str = "127.0.0.1"
    # Port vLLM listens on.
    port: int = 8000
    # Where pulled weights are cached and verified.
    cache_dir: str = "~/.cache/llm-engine"
    # auto | cpu | cuda
    device: str = "auto"
    # Weight/activation dtype: auto | half | float16 | bfloat16 | float | float32.
    dtype: str = "auto"
    # Longest context (prompt + output tokens); unset: the model's own.
    max_model_len: int | None = None
    # Share of each GPU's memory vLLM may use (weights + KV cache); unset: vLLM's default.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # Most sequences in one batch; unset: vLLM's default.
    max_num_seqs: int | None = Field(default=None, gt=0)
    # Most tokens in one batch; unset: vLLM's default.
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    # GPUs one replica shards the model over.
    tensor_parallel_size: int = Field(default=1, ge=1)
    # Pipeline stages (GPUs in sequence) of one replica.
    pipeline_parallel_size: int = Field(default=1, ge=1)
    # e.g. fp8; None = as the checkpoint says
    quantization: str | None = None
    # KV cache dtype, e.g. fp8; unset: as the model.
    kv_cache_dtype: str | None = None
    # Reuse the KV cache of shared prompt prefixes.
    enable_prefix_caching: bool = True
    # Split long prefills into chunks batched with decodes; unset: vLLM's default.
    enable_chunked_prefill: bool | None = None
    # CUDA graphs on by default; eager only as an explicit opt-out (always eager on CPU).
    enforce_eager: bool = False
    # CPU build only: KV cache size (vLLM --kv-cache-memory-bytes), e.g. "64M" or "4G".
    cpu_kv_cache: str | None = "1G"
    # What vLLM runs the model as: None = as the checkpoint says (vLLM's "auto").
    runner: str | None = Field(
        default=None,
        description="vLLM --runner: generate (text generation) or pooling (embeddings, score, rerank); unset = auto",
    )
    convert: str | None = Field(
        default=None,
        description="vLLM --convert: serve a generator checkpoint as a pooling model (embed or classify); unset = auto",
    )
    # Tools: the OpenAI `tools`/`tool_choice` parameters need a parser for the model's tool-call format.
    enable_auto_tool_choice: bool = Field(
        default=False,
        description="vLLM --enable-auto-tool-choice: the model may decide to call tools (tool_choice=auto)",
    )
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM --tool-call-parser (e.g. hermes, llama3_json, mistral, openai): the model's tool-call format; "
        "needed for tool_choice=auto and named tool choices",
    )
    tool_call_structural_tags: bool = Field(
        default=True,
        description="constrain tool calls with the model's own tool-call markup (vLLM's default); false: a named or "
        "required tool_choice is decoded as JSON matching the tool's schema, which honours "
        "structured_outputs_disable_any_whitespace (VLLM_ENFORCE_STRICT_TOOL_CALLING=0)",
    )
    reasoning_parser: str | None = Field(
        default=None, description="vLLM --reasoning-parser (e.g. deepseek_r1, qwen3)"
    )
    responses_store: bool = Field(
        default=False,
        description="keep Responses API results in the engine's memory so GET /v1/responses/{id} and cancel work "
        "(VLLM_ENABLE_RESPONSES_API_STORE; memory grows with every stored response)",
    )
    # Structured output (response_format json_schema, guided decoding).
    structured_outputs_backend: str | None = Field(
        default=None,
        description="vLLM structured-output backend: auto, xgrammar, guidance, outlines, lm-format-enforcer",
    )
    structured_outputs_disable_any_whitespace: bool = Field(
        default=False,
        description="JSON output without free whitespace between tokens (random or weak models otherwise emit endless "
        "whitespace inside JSON); needs the xgrammar or guidance backend (xgrammar is chosen when none is set)",
    )
    # LoRA adapters: name=path-or-s3-uri, comma separated (pulled and verified like the model).
    lora_modules: str | None = Field(
        default=None,
        description="LoRA adapters served at start: name=path-or-s3-uri,... (s3:// ones pulled and verified)",
    )
    enable_lora: bool = Field(
        default=False,
        description="vLLM --enable-lora without adapters at start (adapters loaded at run time)",
    )
    max_loras: int | None = Field(default=None, gt=0, description="vLLM --max-loras: adapters in one batch")
    max_lora_rank: int | None = Field(
        default=None, gt=0, description="vLLM --max-lora-rank: largest adapter rank"
    )
    allow_runtime_lora: bool = Field(
        default=False,
        description="let `llm-engine lora add/remove` load and unload adapters while vLLM runs "
        "(VLLM_ALLOW_RUNTIME_LORA_UPDATING; the engine port must only be reachable by the gateway)",
    )
    # vLLM's own API key for its OpenAI server (the gateway sends it); from a Secret. Passed to vLLM through
    # its environment (VLLM_API_KEY), never on its command line.
    api_key: str | None = None
    # vLLM --load-format (e.g. dummy for random weights of the model's shape).
    load_format: str | None = None
    # Random seed of vLLM's sampling.
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
    # Log level of llm-engine's own lines: debug | info | warning | error.
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_EnvCheck(settings_cls), init_settings, env_settings, file_secret_settings)

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

    @field_validator("runner")
    @classmethod
    def _runner(cls, v: str | None) -> str | None:
        if v is not None and v not in ("auto", "generate", "pooling"):
            raise ValueError("runner must be auto, generate or pooling")
        return None if v == "auto" else v

    @field_validator("convert")
    @classmethod
    def _convert(cls, v: str | None) -> str | None:
        if v is not None and v not in ("auto", "none", "embed", "classify"):
            raise ValueError("convert must be auto, none, embed or classify")
        return None if v == "auto" else v

    @field_validator("structured_outputs_backend")
    @classmethod
    def _so_backend(cls, v: str | None) -> str | None:
        allowed = ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer")
        if v is not None and v not in allowed:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(allowed)}")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> EngineSettings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError(
                "enable_auto_tool_choice needs tool_call_parser (ENGINE_TOOL_CALL_PARSER, e.g. hermes)"
            )
        if self.structured_outputs_disable_any_whitespace and self.structured_outputs_backend in (
            "outlines",
            "lm-format-enforcer",
        ):
            raise ValueError(
                "structured_outputs_disable_any_whitespace needs the xgrammar or guidance backend"
            )
        return self

    @property
    def lora_enabled(self) -> bool:
        return bool(self.enable_lora or self.lora_modules or self.allow_runtime_lora)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        allowed = {"auto", "half", "float16", "bfloat16", "float", "float32"}
        if v not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)}")
        return v


def load_engine_settings(**overrides: Any) -> EngineSettings:
    """EngineSettings from ``ENGINE_*`` (and command-line overrides); any problem is one ConfigError line."""
    try:
        return EngineSettings(**overrides)
    except ValidationError as e:
        loc = e.errors()[0].get("loc") or ("",)
        name = str(loc[0])
        origin = "command line" if name in overrides else f"environment ENGINE_{name.upper()}"
        raise ConfigError(one_line(e, origin)) from None
