"""Gateway settings: one pydantic-settings class, environment variables plus an optional YAML file.

Scalars come from ``GATEWAY_*`` variables (secrets belong there); structure (models, upstreams, keys)
comes from the YAML file named by ``GATEWAY_CONFIG``. Every knob has a default that works on a laptop.
Environment variables win over the YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from configkit import (
    ConfigError,
    StrictModel,
    check_environment,
    check_unknown_keys,
    env_origins,
    one_line,
)
from gateway.audit.config import AuditSettings
from gateway.fairqueue.config import FairQueueSettings
from gateway.quota.config import QuotaSettings


def strip_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without ``user:password@`` (also after a ``dns+`` prefix), and the (decoded) credential if any."""
    prefix = ""
    if url.startswith("dns+"):
        prefix, url = "dns+", url[4:]
    scheme, sep, rest = url.partition("://")
    if not sep:
        return prefix + url, None
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return prefix + url, None
    userinfo, _, host = authority.rpartition("@")
    user, _, password = userinfo.partition(":")
    return f"{prefix}{scheme}://{host}{slash}{path}", (unquote(user), unquote(password))


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` removed, for logs and error messages."""
    return strip_userinfo(url)[0]


class UpstreamTimeouts(StrictModel):
    """Per-phase timeouts (seconds) towards an upstream pool.

    The defaults bound a hung engine (SIGSTOPped, wedged GPU) to seconds, not minutes: a stream that goes
    silent for ``idle`` seconds ends with an error event, a request without a first byte after ``first_byte``
    seconds is retried on another replica. Streams have no total limit. docs/operations.md says when to
    raise them (long prompts on a busy engine, very long non-streamed generations).
    """

    # TCP connect to the replica.
    connect: float = Field(default=5.0, gt=0)
    # Time to first byte: from sending the request to the response headers and, for a stream, its first
    # event. For a non-streamed request vLLM answers only when done, so this also bounds its generation.
    # Before the first byte reached the client a timeout here is retried elsewhere.
    first_byte: float | None = Field(default=None, gt=0)
    # Longest silence between two chunks once the response has begun.
    idle: float | None = Field(default=None, gt=0)
    # Older single knob: when set, the default of both ``first_byte`` and ``idle`` (each wins when set).
    read: float | None = Field(default=None, gt=0)
    # Waiting for a free connection from the pool.
    pool: float = 30.0
    # Whole request, 0 = no limit beyond the per-phase ones (the default: a long stream is never cut).
    total: float = Field(default=0.0, ge=0)

    @property
    def first_byte_s(self) -> float:
        if self.first_byte is not None:
            return self.first_byte
        return self.read if self.read is not None else DEFAULT_FIRST_BYTE_TIMEOUT

    @property
    def idle_s(self) -> float:
        if self.idle is not None:
            return self.idle
        return self.read if self.read is not None else DEFAULT_IDLE_TIMEOUT


# Defaults of UpstreamTimeouts.first_byte / .idle (seconds) when neither they nor ``read`` are set.
DEFAULT_FIRST_BYTE_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 30.0


class ModelConfig(StrictModel):
    """One model the gateway serves: its public name and the engine replicas that serve it."""

    # The name clients send as "model".
    name: str
    # Base URLs of vLLM servers (http://10.0.0.5:8000), or ``dns+http://name:port`` for every A/AAAA record
    # of a name, re-resolved periodically (a Kubernetes headless Service).
    upstreams: list[str] = Field(
        default_factory=list, description="Base URLs of vLLM servers, e.g. http://10.0.0.5:8000"
    )
    # Name the engine serves the model under, when it differs from the public one.
    upstream_model: str | None = None
    # A LoRA adapter: the configured model whose engines serve it (loaded there at start via
    # ENGINE_LORA_MODULES or at run time via `llm-engine lora add`). Requests go to that model's replicas
    # with ``upstream_model`` (default: this name) as the engine's model; access rules, quotas and audit use
    # this name. An adapter has no upstreams of its own.
    base: str | None = Field(default=None, description="for a LoRA adapter: the model whose engines serve it")
    owned_by: str = "private-llm-stack"
    max_connections: int = 1024
    # Idle pooled connections are dropped after this many seconds; keep it below the engine's keep-alive
    # timeout (vLLM/uvicorn: 5 s).
    keepalive_timeout: float = 4.0
    # Bearer key the engines expect (vLLM --api-key), if any. From the environment/secret, never logged.
    upstream_api_key: str | None = None
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    _basic_auth: tuple[str, str] | None = PrivateAttr(default=None)

    @field_validator("upstreams")
    @classmethod
    def _strip_slash(cls, v: list[str]) -> list[str]:
        return [u.rstrip("/") for u in v]

    @model_validator(mode="after")
    def _userinfo(self) -> ModelConfig:
        """``http://user:pass@host`` upstreams: the credential moves to ``upstream_basic_auth`` (sent by the
        model's client session) and the URL keeps only scheme, host, port and path, so no password reaches
        metrics labels, logs or audit records."""
        creds: set[tuple[str, str]] = set()
        clean: list[str] = []
        for u in self.upstreams:
            url, cred = strip_userinfo(u)
            clean.append(url)
            if cred is not None:
                creds.add(cred)
        if len(creds) > 1:
            raise ValueError(f"model {self.name!r}: its upstreams carry different user:password credentials; use one")
        if creds:
            if self.upstream_api_key:
                raise ValueError(f"model {self.name!r}: set either upstream_api_key or user:password in the URLs")
            self._basic_auth = next(iter(creds))
        self.upstreams = clean
        return self

    @property
    def upstream_basic_auth(self) -> tuple[str, str] | None:
        return self._basic_auth


class RoutingSettings(StrictModel):
    """How the gateway chooses among a model's replicas and reacts to their faults (gateway/routing/)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "prefix_affinity" in data:
            raise ValueError(
                "routing.prefix_affinity was replaced by routing.policy: write 'policy: prefix_affinity' "
                "(for true) or 'policy: least_outstanding' (for false)"
            )
        return data

    # How a replica is chosen (gateway/routing/pipeline.py): prefix_affinity (prompts sharing their first
    # prefix_chars characters go to one replica, for vLLM's prefix cache; others to the least outstanding),
    # least_outstanding, power_of_two (the less outstanding of two drawn at random) or kv_cache_aware.
    # A session header keeps a session on one replica under every policy.
    policy: Literal["prefix_affinity", "least_outstanding", "power_of_two", "kv_cache_aware"] = "prefix_affinity"
    # Characters of the prompt hashed into its affinity key (policy prefix_affinity).
    prefix_chars: int = Field(default=1024, ge=16)
    # Policy kv_cache_aware: weight of the engine's KV-cache use (0..1) against its load (normalised to 0..1).
    kv_cache_weight: float = Field(default=1.0, ge=0)
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


class ApiKeyConfig(StrictModel):
    """An API key, stored only as the hex sha256 digest of the key."""

    # Key id: names the principal in logs, metrics and quotas (safe to log).
    id: str
    # Hex sha256 digest of the key (never the key itself).
    sha256: str
    # Principal name; default: the key id.
    subject: str | None = None
    # Tenant the key's usage counts against (quotas, metrics, audit).
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


# Asymmetric signature algorithms a token may use. Never "none", never HMAC: a resource server holds only
# the issuer's public keys, and accepting HS* would let anyone sign with a public key as the HMAC secret.
SAFE_JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)


class IssuerConfig(StrictModel):
    """One trusted token issuer (an OIDC provider / OAuth2 authorization server)."""

    # The exact ``iss`` value in its tokens, e.g. https://keycloak.example/realms/llm
    issuer: str
    # Tokens must name one of these in ``aud``.
    audience: list[str] = Field(
        json_schema_extra={
            "yaml": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
        }
    )
    # Where its signing keys are; if unset, found through ``discovery_url``.
    jwks_url: str | None = None
    # Defaults to ``<issuer>/.well-known/openid-configuration``.
    discovery_url: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    # Clock skew tolerated on exp/nbf/iat (seconds).
    leeway: int = 30
    # Claim names (dotted paths reach into objects, e.g. realm_access.roles).
    subject_claim: str = "sub"
    tenant_claim: str | None = None
    default_tenant: str = "default"
    scope_claims: list[str] = Field(default_factory=lambda: ["scope", "scp", "roles", "groups"])
    # Scope/role/group value -> models it grants ("*" = all). None: use ``auth.role_models``.
    role_models: dict[str, list[str]] | None = None
    # JWKS cache: fresh for ttl; refetched at most every min_refresh_interval (unknown kids included);
    # served stale for up to max_stale past ttl while the issuer cannot be reached.
    jwks_ttl: float = 300.0
    jwks_min_refresh_interval: float = 10.0
    jwks_max_stale: float = 3600.0
    http_timeout: float = 5.0

    @field_validator("audience", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("audience")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v or not all(isinstance(a, str) and a for a in v):
            raise ValueError("audience is required: the value(s) tokens for this gateway carry in 'aud'")
        return v

    @field_validator("algorithms")
    @classmethod
    def _safe_algs(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in SAFE_JWT_ALGORITHMS]
        if bad:
            raise ValueError(
                f"algorithms {bad} are not accepted; use asymmetric ones only: {sorted(SAFE_JWT_ALGORITHMS)}"
            )
        if not v:
            raise ValueError("algorithms must not be empty")
        return v

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        if not v:
            raise ValueError("issuer must not be empty")
        return v


class AuthSettings(StrictModel):
    """JWT issuers and the mapping from token scopes/roles/groups to models."""

    # Trusted token issuers (OIDC providers); empty: JWTs are not accepted.
    issuers: list[IssuerConfig] = Field(default_factory=list)
    # Scope/role/group value -> models it grants ("*" = all models); key "*" applies to every valid token.
    role_models: dict[str, list[str]] = Field(default_factory=dict)
    # Bearer tokens longer than this are rejected before any parsing.
    max_token_bytes: int = 8192
    # Tokens already verified, kept until they expire or the issuer's key set changes (0 = off).
    verified_token_cache_size: int = 1024
    # How often the API key file's mtime is checked for changes (seconds; 0 = only SIGHUP reloads it).
    keys_file_poll_interval: float = 5.0


class MetricsSettings(StrictModel):
    """Bounds on metric labels. Tenants: an explicit allow-list (others fold into "other"), or, when it is
    empty, the tenants of the configured API keys plus the first ``tenant_top_n`` other tenants seen
    (JWT callers) since start."""

    # Tenants that get their own label value; empty: the API keys' tenants plus the first tenant_top_n others seen.
    tenants: list[str] = Field(default_factory=list)
    tenant_top_n: int = Field(default=20, ge=0)


class TracingSettings(StrictModel):
    """OpenTelemetry tracing, off by default: one span per request, exported over OTLP/HTTP."""

    # Export one span per request.
    enabled: bool = False
    # e.g. http://otel-collector:4318/v1/traces; None = the OTEL_EXPORTER_OTLP_* environment variables.
    otlp_endpoint: str | None = None
    service_name: str = "llm-gateway"
    # Share of new traces recorded (a client's sampled/unsampled decision in traceparent wins).
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Seconds between batch exports.
    export_interval: float = Field(default=2.0, gt=0)


class LimitSettings(StrictModel):
    """What one request may cost the gateway before it is authenticated, and how long it may take to arrive.
    Every limit answers with an OpenAI-shaped error and closes the connection where the request is cut short."""

    # Request line plus all header lines, bytes (431 above); number of header lines (431 above).
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    max_header_count: int = Field(default=100, ge=8)
    # Seconds from a request head's first byte until it is complete (408 and close after).
    header_timeout: float = Field(default=10.0, gt=0)
    # Seconds to receive the whole body once the head is in (408 and close after).
    body_timeout: float = Field(default=30.0, gt=0)
    # Deepest nesting of arrays/objects accepted in a JSON body (400 above).
    max_json_depth: int = Field(default=64, ge=4)
    # Length of a client's X-Request-Id kept (longer or with other characters than [A-Za-z0-9._:-]: dropped).
    max_request_id_chars: int = Field(default=128, ge=8)


# Settings that only the file/CLI give, never the YAML file itself.
_NOT_IN_YAML = frozenset({"config_file"})
# Variables with the GATEWAY_ prefix that are not fields of GatewaySettings.
_OTHER_VARIABLES = frozenset({"GATEWAY_CONFIG"})


def read_config_file(path: str) -> dict[str, Any]:
    """The YAML file as a mapping, every key checked against the settings models (ConfigError otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: gateway config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must hold a mapping at the top level")
    check_unknown_keys(GatewaySettings, data, str(p), skip=_NOT_IN_YAML)
    return data


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by GATEWAY_CONFIG (or the config_file init argument)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_config_file(self.path) if self.path else {}


class _EnvCheck(PydanticBaseSettingsSource):
    """Refuses GATEWAY_* variables that name no setting (a typo would otherwise be dropped silently)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        check_environment(GatewaySettings, os.environ, "GATEWAY_", "__", extra_names=_OTHER_VARIABLES)
        return {}


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    config_file: str | None = Field(
        default=None, validation_alias="GATEWAY_CONFIG", description="YAML file with the structured settings."
    )
    # Address to listen on.
    host: str = "127.0.0.1"
    # Port to listen on.
    port: int = 8080
    # debug | info | warning | error.
    log_level: str = "info"
    # uvicorn worker processes. >1 spreads SSE relaying over cores; per-process state (in-process quota
    # counters, circuit breakers) is then per worker: use the Redis quota backend with several workers.
    workers: int = Field(default=1, ge=1)
    # Largest request body accepted, bytes (413 above).
    max_body_bytes: int = 10 * 1024 * 1024
    # Largest audio upload (multipart body of /v1/audio/transcriptions and /translations), bytes (413 above).
    max_audio_bytes: int = Field(default=25 * 1024 * 1024, gt=0, description="largest audio upload in bytes")
    # Responses API: response ids remembered per gateway process (to reach the replica that stores each).
    responses_index_size: int = Field(default=100_000, ge=0, description="response ids remembered for GET/cancel")
    # Header, body-time and JSON limits (docs/security.md).
    limits: LimitSettings = Field(default_factory=LimitSettings)
    # Proxies (IPs or CIDRs, e.g. the ingress controller's Pod range) whose X-Forwarded-For/-Proto is believed.
    # Empty (default): forwarded headers are ignored and the audited client IP is the TCP peer.
    trusted_proxies: list[str] = Field(default_factory=list)
    # /metrics is served on its own port (bind ``metrics_host``), not on the API port. 0 = on the API port,
    # where it then needs ``Authorization: Bearer <metrics_token>`` (from the environment).
    metrics_port: int = Field(default=9091, ge=0, le=65535)
    metrics_host: str | None = None
    metrics_token: str | None = None
    # Set false only for local experiments: every /v1 route then runs as an anonymous principal.
    auth_enabled: bool = True
    # API keys (sha256 digests only; `llm-gateway keys create` makes one).
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    # A file with more keys (YAML list of ApiKeyConfig), re-read when it changes, on SIGHUP and at start.
    api_keys_file: str | None = None
    # The models served and the engine replicas behind each.
    models: list[ModelConfig] = Field(default_factory=list)
    # Seconds between health probes of each upstream.
    health_interval: float = 2.0
    # Seconds a health probe may take.
    health_timeout: float = 2.0
    # Extra attempts on another replica when one cannot be reached (before any byte went to the client).
    max_retries: int = 2
    # Drain: seconds in-flight requests get to finish after SIGTERM.
    drain_timeout: float = 30.0
    # CPython's cyclic garbage collector, per worker: once the app is built, everything alive is moved out of
    # the collector's reach (gc.freeze) and a young collection runs every ``gc_young_threshold`` allocations
    # instead of every 700 (the hot path makes few reference cycles; full collections no longer rescan the
    # imported modules and settings). 0 keeps CPython's defaults and freezes nothing.
    gc_young_threshold: int = Field(default=10_000, ge=0)
    # One JSON line per request at INFO (request id, principal, model, status, tokens, TTFT, duration; never
    # prompt text): gateway/accesslog.py. false turns it off.
    access_log: bool = True
    # Quotas (requests/tokens per minute, concurrency) and overload protection: gateway/quota/config.py.
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    # Per-replica slots, weighted fair queuing, priority classes, shedding: gateway/fairqueue/config.py.
    fair_queue: FairQueueSettings = Field(default_factory=FairQueueSettings)
    # The audit log (gateway/audit/): one record per request, off by default.
    audit: AuditSettings = Field(default_factory=AuditSettings)
    # JWT issuers and role -> model mapping (gateway/auth/tokens.py).
    auth: AuthSettings = Field(default_factory=AuthSettings)
    # Bounds on metric labels.
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    # OpenTelemetry tracing, off by default.
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    # How requests are spread over a model's replicas and how replica faults are handled.
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
        kwargs = getattr(init_settings, "init_kwargs", None) or {}
        path = next(
            (v for k, v in kwargs.items() if k.lower() in ("config_file", "gateway_config") and v), None
        )
        path = path or os.environ.get("GATEWAY_CONFIG")
        return (
            _EnvCheck(settings_cls),
            init_settings,
            env_settings,
            _YamlSource(settings_cls, path),
            file_secret_settings,
        )

    @model_validator(mode="after")
    def _adapters_have_a_base(self) -> GatewaySettings:
        names = {m.name: m for m in self.models}
        for m in self.models:
            if m.base is None:
                continue
            b = names.get(m.base)
            if b is None:
                raise ValueError(f"models[{m.name}]: base {m.base!r} is not a configured model")
            if b.base is not None:
                raise ValueError(f"models[{m.name}]: base {m.base!r} is itself an adapter")
            if m.upstreams:
                raise ValueError(f"models[{m.name}]: an adapter (base: {m.base}) has no upstreams of its own")
        return self

    def pool_name(self, name: str) -> str:
        """The model whose replicas serve ``name`` (itself, or an adapter's base)."""
        m = self.model(name)
        return m.base if m is not None and m.base else name

    def model(self, name: str) -> ModelConfig | None:
        # Looked up on every request: a dict by name, built once per models list (kept outside the model: a
        # pydantic private attribute costs more to read than the dict saves).
        index = _MODEL_INDEX[0]
        if index is None or index[0] is not self.models:
            index = _MODEL_INDEX[0] = (self.models, {m.name: m for m in reversed(self.models)})
        return index[1].get(name)


# The last models list looked up and its index by name (one settings object per process in practice; another
# list, a test's other settings, rebuilds it).
_MODEL_INDEX: list[tuple[list[ModelConfig], dict[str, ModelConfig]] | None] = [None]


def load_settings(config_file: str | None = None, **overrides: Any) -> GatewaySettings:
    """GatewaySettings from the environment and the YAML file; any problem is one :class:`ConfigError` line
    naming the key and where its value came from (the file, a variable, the command line)."""
    init = dict(overrides)
    if config_file:
        init["config_file"] = config_file
    try:
        return GatewaySettings(**init)
    except ValidationError as e:
        raise ConfigError(
            one_line(e, _origin_of_error(e, config_file or os.environ.get("GATEWAY_CONFIG")))
        ) from None


def _origin_of_error(e: ValidationError, path: str | None) -> str:
    loc = tuple(str(p).lower() for p in (e.errors()[0].get("loc") or ()))
    env = env_origins(GatewaySettings, os.environ, "GATEWAY_", "__")
    for n in range(len(loc), 0, -1):
        if loc[:n] in env:
            return f"environment {env[loc[:n]]}"
    return path or "settings"
