"""Fair-queue settings: slots per replica, priority classes, weights per tenant and principal.

Only pydantic here, so ``gateway/settings.py`` can nest :class:`FairQueueSettings` without import cycles.

```yaml
fair_queue:
  enabled: true
  slots_per_replica: 64          # sequences in flight per replica; 0 = adapt to the engine's metrics
  fair_share_headroom_per_replica: 8   # extra slots for tenants below their fair share
  engine_priority: true          # send vLLM's request `priority` (engine runs --scheduling-policy priority)
  classes:
    interactive: {rank: 0, max_wait: 2.0, engine_priority: 0, extra_slots_per_replica: 8}
    batch: {rank: 1, max_wait: 120.0, engine_priority: 10}
  default: {weight: 1, classes: [interactive, batch], default_class: interactive}
  tenants:
    team-a: {weight: 4}
    etl: {weight: 1, classes: [batch]}
  principals:
    ci-bot: {weight: 0.5, classes: [batch]}          # by API key id or subject
  scope_classes: {llm-interactive: [interactive]}    # JWT scope/role/group -> classes it allows
```
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from configkit import StrictModel


class PriorityClass(StrictModel):
    """A priority class: lower ``rank`` is served first; a request queued past ``max_wait`` gets a 503."""

    # Order between classes: lower is served first (strict priority).
    rank: int = Field(default=0, ge=0)
    # Longest queue wait (seconds) before a 503; a request predicted to wait longer is shed at once.
    max_wait: float = Field(default=5.0, gt=0)
    # vLLM's request priority for this class (lower = earlier) when ``engine_priority`` is on.
    engine_priority: int = 0
    # Slots per replica beyond ``slots_per_replica`` that only this class may use (headroom that keeps an
    # interactive request from waiting for a batch request to finish).
    extra_slots_per_replica: int = Field(default=0, ge=0)


class FairShare(StrictModel):
    """A tenant's or principal's share of the slots and the classes it may use."""

    # Share of the slots relative to the others while they compete (2 = twice a weight-1 share).
    weight: float = Field(default=1.0, gt=0)
    # Classes it may ask for (header / JWT scope); None = inherit (principal -> tenant -> default).
    classes: list[str] | None = None
    # Class used when the request names none; None = inherit, and finally the most urgent allowed class.
    default_class: str | None = None


class AdaptiveSlots(StrictModel):
    """Slots per replica derived from the engine's metrics (``slots_per_replica: 0``)."""

    # Slots per replica to start with.
    initial: int = Field(default=32, ge=1)
    # Never fewer slots per replica than this.
    min: int = Field(default=4, ge=1)
    # Never more slots per replica than this.
    max: int = Field(default=256, ge=1)
    # Grow only while the engine's KV cache use is below this fraction.
    kv_high: float = Field(default=0.9, gt=0, le=1)
    # How often the budget is adjusted (seconds).
    interval: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AdaptiveSlots:
        if not self.min <= self.initial <= self.max:
            raise ValueError("fair_queue.adaptive: need min <= initial <= max")
        return self


def _default_classes() -> dict[str, dict[str, float]]:
    return {
        "interactive": {"rank": 0, "max_wait": 5.0, "engine_priority": 0},
        "batch": {"rank": 1, "max_wait": 300.0, "engine_priority": 10},
    }


class FairQueueSettings(StrictModel):
    # Hold requests beyond a per-replica budget in the gateway and grant slots fairly (off by default).
    enabled: bool = False
    # Sequences in flight per replica (this gateway process); the rest wait in the gateway's queue.
    # 0 = adapt between adaptive.min and adaptive.max from the engine's queue and KV-cache metrics.
    slots_per_replica: int = Field(default=0, ge=0)
    adaptive: AdaptiveSlots = Field(default_factory=AdaptiveSlots)
    # Slots per replica beyond the budget for tenants that hold less than their weighted share of it (a light
    # tenant then never waits for a heavy tenant's slots to turn over). Its requests are also sent with an
    # engine priority one better than their class's when engine_priority is on.
    fair_share_headroom_per_replica: int = Field(default=0, ge=0)
    # Requests waiting at once per model; beyond that: 503 at once.
    max_queued: int = Field(default=4096, ge=0)
    # Service is charged per request ("requests") or by its size, prompt estimate + max_tokens ("tokens").
    cost: Literal["requests", "tokens"] = "tokens"
    # max_tokens assumed when a request sets none (cost and shedding only).
    default_max_tokens: int = Field(default=256, ge=1)
    chars_per_token: float = Field(default=4.0, gt=0)
    # Request header naming the class (e.g. "X-Priority-Class: batch"); "" = headers are ignored.
    class_header: str = "x-priority-class"
    # Send vLLM's request ``priority`` (the class's engine_priority). Only for engines started with
    # ``--scheduling-policy priority`` (ENGINE_SCHEDULING_POLICY=priority); others reject priority != 0.
    engine_priority: bool = False
    # Retry-After bounds on a shed request (seconds).
    retry_after_min: int = Field(default=1, ge=1)
    retry_after_max: int = Field(default=60, ge=1)
    # Slot hold times averaged for the wait prediction: weight of the newest sample.
    hold_ewma: float = Field(default=0.05, gt=0, le=1)
    classes: dict[str, PriorityClass] = Field(default_factory=_default_classes, validate_default=True)
    default: FairShare = Field(default_factory=FairShare)
    tenants: dict[str, FairShare] = Field(default_factory=dict)
    # By API key id or subject.
    principals: dict[str, FairShare] = Field(default_factory=dict)
    # JWT scope/role/group value -> classes it allows (added to what the principal/tenant entries allow).
    scope_classes: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> FairQueueSettings:
        if not self.classes:
            raise ValueError("fair_queue.classes must name at least one class")
        known = set(self.classes)

        def check(where: str, share: FairShare) -> None:
            for c in [*(share.classes or []), *([share.default_class] if share.default_class else [])]:
                if c not in known:
                    raise ValueError(f"fair_queue.{where}: unknown class {c!r} (known: {sorted(known)})")

        check("default", self.default)
        for name, s in self.tenants.items():
            check(f"tenants.{name}", s)
        for name, s in self.principals.items():
            check(f"principals.{name}", s)
        for scope, cs in self.scope_classes.items():
            for c in cs:
                if c not in known:
                    raise ValueError(
                        f"fair_queue.scope_classes.{scope}: unknown class {c!r} (known: {sorted(known)})"
                    )
        if self.retry_after_min > self.retry_after_max:
            raise ValueError("fair_queue: retry_after_min must not exceed retry_after_max")
        return self
