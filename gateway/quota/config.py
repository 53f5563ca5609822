"""Quota settings: limits per principal / tenant (optionally per model), the backend, overload protection.

Only pydantic (and the URL parser of ``resp``, which imports nothing of the gateway) here, so
``gateway/settings.py`` can nest :class:`QuotaSettings` without import cycles.

```yaml
quota:
  backend: redis                      # memory (one replica) | redis (shared by every replica)
  redis_url: redis://redis:6379/0     # secrets: GATEWAY_QUOTA__REDIS_URL
  on_backend_error: open              # open: local limits while Redis is down | closed: 503
  default: {rpm: 60, tpm: 100000, max_concurrent: 8}     # principals without an entry of their own
  principals:
    ci-bot: {rpm: 10, tpm: 20000, models: {big-model: {rpm: 2}}}   # by API key id or subject
  tenants:
    team-a: {rpm: 600, tpm: 1000000}
  overload: {enabled: true, queue_threshold: 16, max_wait: 2, max_queued: 64}
```
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, ConfigDict, Field, field_validator

from configkit import StrictModel
from gateway.quota.resp import parse_url


class Limits(StrictModel):
    """One set of limits; ``None`` (or 0) means unlimited."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    # Requests per minute (alias rpm).
    requests_per_minute: int | None = Field(
        default=None, ge=0, validation_alias=AliasChoices("requests_per_minute", "rpm")
    )
    # Prompt + completion tokens per minute.
    tokens_per_minute: int | None = Field(
        default=None, ge=0, validation_alias=AliasChoices("tokens_per_minute", "tpm")
    )
    max_concurrent: int | None = Field(
        default=None, ge=0, validation_alias=AliasChoices("max_concurrent", "concurrency", "max_concurrency")
    )

    @property
    def rpm(self) -> int:
        return self.requests_per_minute or 0

    @property
    def tpm(self) -> int:
        return self.tokens_per_minute or 0

    @property
    def concurrency(self) -> int:
        return self.max_concurrent or 0

    @property
    def empty(self) -> bool:
        return not (self.rpm or self.tpm or self.concurrency)


class ScopeLimits(Limits):
    """Limits of a principal or tenant, with optional extra limits per model (applied in addition)."""

    # Extra limits per model name (applied in addition).
    models: dict[str, Limits] = Field(default_factory=dict)


class OverloadSettings(StrictModel):
    """Bounded waiting in front of engines whose queues are already long."""

    model_config = ConfigDict(extra="forbid")

    # Hold requests briefly (then 503) while every replica's vLLM queue is long.
    enabled: bool = False
    # A replica is overloaded when its vllm:num_requests_waiting is above this.
    queue_threshold: int = Field(default=16, ge=0)
    # How long a request may wait for a replica to drain below the threshold (seconds).
    max_wait: float = Field(default=2.0, ge=0)
    # Requests allowed to wait at once per model; beyond that: 503 at once.
    max_queued: int = Field(default=64, ge=0)
    # How often a waiting request re-checks the replicas' queues (seconds).
    poll_interval: float = Field(default=0.05, gt=0)
    # Retry-After (seconds) on the 503.
    retry_after: int = Field(default=2, ge=1)
    # Engine queue readings older than this (seconds) are not trusted (treated as not overloaded).
    metrics_max_age: float = Field(default=10.0, gt=0)


class QuotaSettings(StrictModel):
    model_config = ConfigDict(extra="forbid")

    # Enforce quotas (when any limit or overload protection is configured).
    enabled: bool = True
    # memory: counters per gateway process; redis: shared by every replica and worker.
    backend: Literal["memory", "redis"] = "memory"
    # Redis for backend: redis (credentials: set it through GATEWAY_QUOTA__REDIS_URL):
    # redis://[[user]:password@]host[:port][/db], rediss://... (TLS; ?ssl_cert_reqs=none|optional|required,
    # ?ssl_ca_certs=PATH) or unix:///path.sock[?db=N].
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connect timeout and reply timeout per command towards Redis (seconds): how long a request may wait on a
    # sick Redis before the configured failure mode applies.
    redis_timeout: float = Field(default=1.0, gt=0)
    # Connections per gateway process. Commands are pipelined on them (Redis runs one at a time anyway), so
    # one or two are enough; more only spread the replies over more sockets.
    redis_max_connections: int = Field(default=1, ge=1)
    # Commands waiting for replies per connection; beyond that a request is decided without Redis
    # (on_backend_error) at once instead of queueing behind a Redis that cannot keep up.
    redis_max_pending: int = Field(default=4096, ge=1)
    # After a Redis failure, requests skip Redis for this long before one tries again (seconds).
    redis_retry_interval: float = Field(default=1.0, ge=0)
    key_prefix: str = "llmgw:quota:"
    # When the backend is unreachable: "open" = enforce local (per-replica) limits, "closed" = 503.
    on_backend_error: Literal["open", "closed"] = "open"
    # Limits for principals that have no entry in ``principals``.
    default: Limits = Field(default_factory=Limits)
    # Per principal, keyed by API key id or subject.
    principals: dict[str, ScopeLimits] = Field(default_factory=dict)
    # Per tenant (every principal of the tenant counts against it).
    tenants: dict[str, ScopeLimits] = Field(default_factory=dict)
    # Reservation at admission: prompt estimate + max_tokens (this when the request sets none).
    default_max_tokens: int = Field(default=256, ge=0)
    chars_per_token: float = Field(default=4.0, gt=0)
    # Template tokens added per chat message to the prompt estimate (role markers, separators).
    tokens_per_message: int = Field(default=4, ge=0)
    # A concurrency slot not released (a gateway replica died mid-request) frees itself after this (seconds).
    concurrency_lease: float = Field(default=900.0, gt=0)
    overload: OverloadSettings = Field(default_factory=OverloadSettings)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        parse_url(v)  # redis://[[user]:password@]host[:port][/db], rediss://..., unix:///path.sock[?db=N]
        return v

    @property
    def has_limits(self) -> bool:
        if not self.default.empty:
            return True
        for scope in (*self.principals.values(), *self.tenants.values()):
            if not scope.empty or any(not m.empty for m in scope.models.values()):
                return True
        return False

    @property
    def active(self) -> bool:
        return self.enabled and (self.has_limits or self.overload.enabled)
