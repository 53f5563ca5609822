"""The admission chain: the ordered steps a parsed, authenticated request passes before it is routed.

``build_admission_chain`` is the one place the order is written down, cheapest refusals first:

1. ``model_access``: may this principal use this model? (403; no state, no wait)
2. ``quota``: first the size check (one request larger than a tokens-per-minute limit: 429 at once, from
   the same bucket lookup, before any backend round trip), then requests/tokens per minute and concurrency
   (429), reserved now and settled on real usage by the step's ticket.
3. ``audit_backpressure``: while the audit queue is full, hold (``on_full: block``) or refuse (503).
4. ``overload``: while every replica's queue is long, wait (bounded) for one to drain; 503 past the bound.
5. ``fair_queue`` (``gateway/fairqueue/``, when enabled): a slot per request, N per replica; the rest wait
   in the gateway, ordered by class, then weighted fair share of tenant and principal; shed (503 +
   Retry-After) when the predicted wait exceeds the class's budget. Its ticket frees the slot.

Model access comes before the size check so that a caller who may not use a model never learns its limits.
Waiting steps come last, so that no request waits only to be refused by a cheap check after the wait.

A step (``gateway.hooks.AdmissionStep``) refuses by raising, passes by returning None, or returns a Ticket
for what it holds until the request ends. When a step refuses (or the client leaves
while a step waits), the tickets of the steps before it are settled at once: reservations are returned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.admission.overload import OverloadGuard
from gateway.auth.authenticator import unauthorized
from gateway.context import RequestContext
from gateway.hooks import NO_TICKET, AdmissionStep, Authenticator, Ticket
from gateway.quota.admission import QuotaAdmission
from gateway.quota.config import QuotaSettings
from gateway.quota.metrics import QuotaMetrics

if TYPE_CHECKING:
    from gateway.audit.writer import AuditWriter
    from gateway.routing.pool import EndpointPool

log = logging.getLogger("gateway.admission")


class ModelAccess:
    """403 unless the authenticated principal may use the requested model."""

    name = "model_access"

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def admit(self, ctx: RequestContext) -> Ticket | None:
        if ctx.principal is None:
            raise unauthorized("Authentication required.")
        if ctx.model is not None:
            self.auth.authorize(ctx.principal, ctx.model)
        return None


class _Tickets:
    """Settles the tickets of several steps, last step first."""

    __slots__ = ("tickets",)

    def __init__(self, tickets: list[Ticket]) -> None:
        self.tickets = tickets

    async def settle(self, ctx: RequestContext) -> None:
        for t in reversed(self.tickets):
            try:
                await t.settle(ctx)
            except Exception:
                log.exception("settling an admission ticket failed", extra={"request_id": ctx.request_id})


class AdmissionChain:
    """Runs the steps in order; the request is admitted when every step passed."""

    def __init__(self, steps: Sequence[AdmissionStep]) -> None:
        self.steps = tuple(steps)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    async def admit(self, ctx: RequestContext) -> Ticket:
        held: list[Ticket] = []
        try:
            for step in self.steps:
                ticket = await step.admit(ctx)
                if ticket is not None and ticket is not NO_TICKET:
                    held.append(ticket)
        except BaseException:
            # Refused (or the client left) part-way: give back what the earlier steps hold.
            await _Tickets(held).settle(ctx)
            raise
        if not held:
            return NO_TICKET
        return held[0] if len(held) == 1 else _Tickets(held)


class AuditBackpressure:
    """Hold or refuse new requests while the audit queue is full (gateway/audit/writer.py explains why)."""

    name = "audit_backpressure"

    def __init__(self, writer: AuditWriter) -> None:
        from gateway.audit.writer import AuditGate
        from gateway.hooks import NoAdmissionControl

        self._gate = AuditGate(NoAdmissionControl(), writer)
        self._writer = writer

    async def admit(self, ctx: RequestContext) -> Ticket | None:
        if self._writer.queue.full():  # the gate holds or refuses only while the queue is full
            await self._gate.admit(ctx)
        return None


def build_admission_chain(
    quota: QuotaSettings,
    auth: Authenticator,
    pools: dict[str, EndpointPool],
    stats: QuotaMetrics | None = None,
    audit: AuditWriter | None = None,
    fair_queue: AdmissionStep | None = None,
) -> tuple[AdmissionChain, QuotaAdmission | None]:
    """The admission chain for these settings (and the quota step, whose backend must be closed at shutdown).
    The quota and overload steps count into ``stats`` (exported by gateway/metrics/).

    The order below is the order requests see; see the module's docstring for why."""
    steps: list[AdmissionStep] = [ModelAccess(auth)]
    quota_step: QuotaAdmission | None = None
    metrics = stats
    if quota.enabled and quota.has_limits:
        quota_step = QuotaAdmission(quota, metrics)
        steps.append(quota_step)
    if audit is not None:
        steps.append(AuditBackpressure(audit))
    if quota.enabled and quota.overload.enabled:
        steps.append(OverloadGuard(quota.overload, pools, metrics))
    if fair_queue is not None:
        steps.append(fair_queue)
    return AdmissionChain(steps), quota_step


__all__ = ["AdmissionChain", "AuditBackpressure", "ModelAccess", "OverloadGuard", "build_admission_chain"]
