"""Gateway settings: one pydantic-settings class, environment variables plus an optional YAML file.

Scalars come from ``GATEWAY_*`` variables (secrets belong there); structure (models, upstreams, keys)
comes from the YAML file named by ``GATEWAY_CONFIG``. Every knob has a default that works on a laptop.
Environment variables win over the YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class UpstreamTimeouts(BaseModel):
    """Per-phase timeouts (seconds) towards an upstream pool."""

    connect: float = 5.0
    # Time to first byte of the response (headers), and the longest gap between two chunks.
    read: float = 300.0
    write: float = 30.0
    # Waiting for a free connection from the pool.
    pool: float = 30.0
    # Whole request, 0 = no limit beyond the per-phase ones.
    total: float = 0.0
    # Time to first byte: from sending the request to the response headers and, for a stream, its first
    # event. For a non-streamed request vLLM answers only when done, so this also bounds its generation.
    # Unset = ``read``. Before the first byte reached the client a timeout here is retried elsewhere.
    first_byte: float | None = None
    # Longest silence between two chunks once the response has begun. Unset = ``read``.
    idle: float | None = None

    @property
    def first_byte_s(self) -> float:
        return self.first_byte if self.first_byte is not None else self.read

    @property
    def idle_s(self) -> float:
        return self.idle if self.idle is not None else self.read


class ModelConfig(BaseModel):
    """One model the gateway serves: its public name and the engine replicas that serve it."""

    name: str
    # Base URLs of vLLM servers (http://10.0.0.5:8000), or ``dns+http://name:port`` for every A/AAAA record
    # of a name, re-resolved periodically (a Kubernetes headless Service).
    upstreams: list[str] = Field(default_factory=list, description="Base URLs of vLLM servers, e.g. http://10.0.0.5:8000")
    # Name the engine serves the model under, when it differs from the public one.
    upstream_model: str | None = None
    owned_by: str = "private-llm-stack"
    max_connections: int = 1024
    # Bearer key the engines expect (vLLM --api-key), if any. From the environment/secret, never logged.
    upstream_api_key: str | None = None
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)

    @field_validator("upstreams")
    @classmethod
    def _strip_slash(cls, v: list[str]) -> list[str]:
        return [u.rstrip("/") for u in v]


class RoutingSettings(BaseModel):
    """How the gateway chooses among a model's replicas and reacts to their faults (gateway/routing/)."""

    # Prefix affinity: requests whose prompt shares its first ``prefix_chars`` characters (a system prompt,
    # a conversation's start) go to the same replica (vLLM's prefix cache) via a consistent-hash ring.
    prefix_affinity: bool = True
    prefix_chars: int = Field(default=1024, ge=16)
    # Bounded load: a replica takes an affinity request only while its load stays under
    # ceil(load_factor * mean load); a hot prefix spills over to the next replica on the ring.
    load_factor: float = Field(default=1.25, ge=1.0)
    virtual_nodes: int = Field(default=64, ge=1)
    # Header naming a session: requests of one session stick to one replica (same bounded-load ring).
    session_header: str | None = "x-session-id"
    # Active health: consecutive failed /health probes before a replica is taken out of rotation.
    unhealthy_after: int = Field(default=2, ge=1)
    # Circuit breaker per replica: consecutive upstream faults (connect errors, 5xx, timeouts; never a
    # client's 4xx) that open it; how long it stays open before one half-open trial request (doubling on
    # each re-open up to ``breaker_max_open``).
    breaker_failures: int = Field(default=5, ge=1)
    breaker_open: float = Field(default=5.0, gt=0)
    breaker_max_open: float = Field(default=60.0, gt=0)
    # Passive outlier ejection: over the last ``outlier_window`` attempts on a replica, a fault ratio of at
    # least ``outlier_ratio`` (with ``outlier_min_requests`` seen) ejects it for ``outlier_eject`` seconds
    # (times the number of ejections so far, capped at ``breaker_max_open``); never more than
    # ``outlier_max_ejected`` of a pool at once.
    outlier_window: int = Field(default=20, ge=1)
    outlier_min_requests: int = Field(default=10, ge=1)
    outlier_ratio: float = Field(default=0.5, gt=0, le=1)
    outlier_eject: float = Field(default=10.0, gt=0)
    outlier_max_ejected: float = Field(default=0.5, ge=0, le=1)
    # Retry budget per pool: retries may add at most ``retry_ratio`` of the requests seen over the last
    # ``retry_window`` seconds, plus ``retry_min`` per window so a quiet pool can still fail over.
    retry_ratio: float = Field(default=0.2, ge=0)
    retry_window: float = Field(default=10.0, gt=0)
    retry_min: int = Field(default=10, ge=0)
    # How often ``dns+http://name:port`` upstreams are re-resolved (seconds).
    dns_interval: float = Field(default=5.0, gt=0)


class ApiKeyConfig(BaseModel):
    """An API key, stored only as the hex sha256 digest of the key."""

    id: str
    sha256: str
    subject: str | None = None
    tenant: str = "default"
    # Models this key may use; ["*"] means every configured model.
    models: list[str] = Field(default_factory=lambda: ["*"])
    disabled: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower()
        if v.startswith("sha256:"):
            v = v[len("sha256:") :]
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("sha256 must be 64 hex digits (the digest of the key, not the key)")
        return v


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by GATEWAY_CONFIG (or the config_file init argument)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        p = Path(self.path)
        if not p.is_file():
            raise ValueError(f"gateway config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"gateway config file {p} must hold a mapping at the top level")
        return data


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="ignore")

    config_file: str | None = Field(default=None, validation_alias="GATEWAY_CONFIG")
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"
    # Largest request body accepted, bytes (413 above).
    max_body_bytes: int = 10 * 1024 * 1024
    # Set false only for local experiments: every /v1 route then runs as an anonymous principal.
    auth_enabled: bool = True
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    # A file with more keys (YAML list of ApiKeyConfig), re-read on SIGHUP / at start.
    api_keys_file: str | None = None
    models: list[ModelConfig] = Field(default_factory=list)
    # Health probing of upstreams (seconds).
    health_interval: float = 2.0
    health_timeout: float = 2.0
    # Extra attempts on another replica when one cannot be reached (before any byte went to the client).
    max_retries: int = 2
    # Drain: seconds in-flight requests get to finish after SIGTERM.
    drain_timeout: float = 30.0
    # Forward W3C traceparent and X-Request-Id to engines.
    forward_request_id: bool = True
    routing: RoutingSettings = Field(default_factory=RoutingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = None
        if isinstance(init_settings, PydanticBaseSettingsSource):
            path = init_settings.init_kwargs.get("config_file") if hasattr(init_settings, "init_kwargs") else None
        path = path or os.environ.get("GATEWAY_CONFIG")
        return (init_settings, env_settings, _YamlSource(settings_cls, path), file_secret_settings)

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None
