"""The fair queue of one model: slots, priority classes and weighted fair sharing. Pure logic, no I/O.

A request takes a *slot* (one sequence in flight on some replica) for its whole life. While slots are
free it gets one at once; otherwise it waits here, in the gateway, instead of in the engine's own queue.
When a slot frees, the next request is chosen in three steps:

1. **Class** (strict priority): the lowest ``rank`` with someone waiting (interactive before batch). A
   class may also use ``extra`` slots beyond the shared capacity that the others may not.
2. **Tenant** (weighted fair queuing): the tenant with the least service so far relative to its weight.
   Each tenant has a virtual time that grows by ``cost / weight`` with every slot it is granted; the
   smallest goes next. A tenant that was idle starts at the class's virtual clock (the start tag of the
   last grant) rather than at its old value, so idling banks no credit and a busy tenant is never starved:
   every grant moves the clock forward, and the one with the smallest tag is always the next served.
   This is start-time fair queuing (Goyal et al., 1996): a light tenant waits for about one slot, not
   behind a heavy tenant's backlog.
3. **Principal** within the tenant: the same rule one level down (API key or subject), then FIFO.

When every slot is taken, a tenant that holds less than its weighted share of the capacity may still take
one of a few *headroom* slots at once (and waiters of such tenants get the headroom first): slots turn over
in bursts when many requests of one size started together, and a light tenant should not wait for a burst.

Immediate grants are charged too, so a tenant that used a lot while others were idle is served after
them once they arrive. The wait a new request would have is predicted from how many requests would be
served before it and the measured slot hold time (``predict_wait``); the admission step sheds requests
whose prediction exceeds their class's budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class Waiter:
    """One request: queued, then granted a slot (``granted``), then released exactly once."""

    tenant: str
    principal: str
    cls: str
    cost: float
    enqueued: float
    notify: Callable[[Waiter], None] | None = None
    granted: bool = False
    granted_at: float | None = None
    released: bool = False
    # A grant beyond any capacity (no replica available): counted, but never holds anyone back.
    unlimited: bool = False
    # Granted one of the fair-share headroom slots (its tenant held less than its share).
    under_share: bool = False


@dataclass(eq=False, slots=True)
class _Flow:
    """A principal's FIFO within a tenant."""

    weight: float
    vtime: float = 0.0
    queue: deque[Waiter] = field(default_factory=deque)


@dataclass(eq=False, slots=True)
class _Tenant:
    weight: float
    vtime: float = 0.0
    queued: int = 0
    queued_cost: float = 0.0
    # Virtual clock among this tenant's principals.
    vclock: float = 0.0
    flows: dict[str, _Flow] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Class:
    name: str
    rank: int
    extra: int = 0
    vclock: float = 0.0
    queued: int = 0
    tenants: dict[str, _Tenant] = field(default_factory=dict)


class FairQueue:
    """Slots and waiters of one model. ``weight_of(tenant, principal) -> (tenant_weight, principal_weight)``."""

    def __init__(
        self,
        classes: dict[str, tuple[int, int]],
        weight_of: Callable[[str, str], tuple[float, float]] | None = None,
        hold_ewma: float = 0.05,
    ) -> None:
        # classes: name -> (rank, extra slots over the whole pool)
        self._classes = {n: _Class(n, r, e) for n, (r, e) in classes.items()}
        self._order = sorted(self._classes.values(), key=lambda c: (c.rank, c.name))
        self._weight_of = weight_of or (lambda t, p: (1.0, 1.0))
        self.capacity = 0
        self.in_use = 0
        # Slots beyond capacity for tenants holding less than their weighted share of it.
        self.headroom = 0
        # Slots held per tenant (only tenants holding some).
        self.tenant_in_use: dict[str, int] = {}
        self.hold_ewma = hold_ewma
        # Mean seconds a slot is held (None until the first release).
        self.mean_hold: float | None = None
        # Counters for metrics.
        self.granted_total = 0
        self.released_total = 0

    # -- configuration ---------------------------------------------------------------------------------------

    def set_capacity(
        self, capacity: int, extra: dict[str, int] | None = None, headroom: int | None = None
    ) -> list[Waiter]:
        """New shared capacity (and per-class extra slots, fair-share headroom); returns the waiters this
        lets in."""
        self.capacity = max(0, capacity)
        if headroom is not None:
            self.headroom = max(0, headroom)
        if extra is not None:
            for name, c in self._classes.items():
                c.extra = max(0, extra.get(name, 0))
        return self.dispatch(None)

    @property
    def queued(self) -> int:
        return sum(c.queued for c in self._order)

    def queued_by(self) -> dict[tuple[str, str], int]:
        """(class, tenant) -> requests waiting."""
        out: dict[tuple[str, str], int] = {}
        for c in self._order:
            for name, t in c.tenants.items():
                if t.queued:
                    out[(c.name, name)] = t.queued
        return out

    def limit(self, cls: str) -> int:
        return self.capacity + self._classes[cls].extra

    def under_share(self, tenant: str) -> bool:
        """Would one more slot keep ``tenant`` within its weighted share of the capacity, among the tenants
        holding or waiting for slots now?"""
        held = self.tenant_in_use.get(tenant, 0)
        active = set(self.tenant_in_use)
        for c in self._order:
            if c.queued:
                active.update(n for n, t in c.tenants.items() if t.queued)
        active.add(tenant)
        weights = {t: self._weight_of(t, "")[0] for t in active}
        return held + 1 <= self.capacity * weights[tenant] / sum(weights.values())

    # -- the life of a request -------------------------------------------------------------------------------

    def request(self, w: Waiter, now: float) -> bool:
        """Grant ``w`` a slot now if one is free and nobody of its class or a more urgent one waits;
        else queue it. Returns whether it was granted."""
        c = self._classes[w.cls]
        if self.in_use < self.limit(w.cls) and not any(o.queued for o in self._order if o.rank <= c.rank):
            t, f = self._flow(c, w)
            self._charge(c, t, f, w)
            self._grant(w, now)
            return True
        if self.headroom and self.in_use < self.limit(w.cls) + self.headroom and self.under_share(w.tenant):
            # Full, but this tenant holds less than its share: a headroom slot, so it does not wait for
            # the heavy tenants' slots to turn over.
            t, f = self._flow(c, w)
            self._charge(c, t, f, w)
            w.under_share = True
            self._grant(w, now)
            return True
        t, f = self._flow(c, w)
        if not t.queued:
            t.vtime = max(t.vtime, c.vclock)
        if not f.queue:
            f.vtime = max(f.vtime, t.vclock)
        f.queue.append(w)
        t.queued += 1
        t.queued_cost += w.cost
        c.queued += 1
        return False

    def cancel(self, w: Waiter, now: float) -> list[Waiter]:
        """The request went away (client gone, timed out): drop it from the queue, or release its slot."""
        if w.granted:
            return self.release(w, now)
        c = self._classes[w.cls]
        t = c.tenants.get(w.tenant)
        f = t.flows.get(w.principal) if t else None
        if t is None or f is None:
            return []
        try:
            f.queue.remove(w)
        except ValueError:
            return []
        t.queued -= 1
        t.queued_cost -= w.cost
        c.queued -= 1
        self._forget(c, t, w)
        return []

    def release(self, w: Waiter, now: float) -> list[Waiter]:
        """The request ended: free its slot (once) and return the waiters let in."""
        if not w.granted or w.released:
            return []
        w.released = True
        self.released_total += 1
        if w.unlimited:
            return []
        self.in_use -= 1
        n = self.tenant_in_use.get(w.tenant, 0) - 1
        if n > 0:
            self.tenant_in_use[w.tenant] = n
        else:
            self.tenant_in_use.pop(w.tenant, None)
        if w.granted_at is not None:
            held = max(0.0, now - w.granted_at)
            m = self.mean_hold
            self.mean_hold = held if m is None else m + self.hold_ewma * (held - m)
        return self.dispatch(now)

    def grant_unlimited(self, w: Waiter, now: float) -> None:
        """Let a request through without a slot (no replica is available: the proxy will answer it)."""
        w.unlimited = True
        w.granted = True
        w.granted_at = now
        self.granted_total += 1

    def dispatch(self, now: float | None) -> list[Waiter]:
        """Grant free slots to waiters: most urgent class first, then the fair choice within it."""
        out: list[Waiter] = []
        while True:
            c = next((c for c in self._order if c.queued and self.in_use < self.limit(c.name)), None)
            if c is None:
                break
            w = self._pop(c)
            self._grant(w, now if now is not None else w.enqueued)
            out.append(w)
        # Headroom: waiters of tenants below their share, most urgent class first, least served first.
        while self.headroom:
            pick = None
            for c in self._order:
                if not c.queued or self.in_use >= self.limit(c.name) + self.headroom:
                    continue
                under = [n for n, t in c.tenants.items() if t.queued and self.under_share(n)]
                if under:
                    pick = (c, min(under, key=lambda n: c.tenants[n].vtime))
                    break
            if pick is None:
                break
            w = self._pop(pick[0], pick[1])
            w.under_share = True
            self._grant(w, now if now is not None else w.enqueued)
            out.append(w)
        return out

    # -- prediction ------------------------------------------------------------------------------------------

    def ahead_of(self, tenant: str, principal: str, cls: str, cost: float) -> int:
        """How many waiting requests would be served before a new one (approximately)."""
        c = self._classes[cls]
        ahead = sum(o.queued for o in self._order if o.rank < c.rank)
        t = c.tenants.get(tenant)
        tw, _ = self._weight_of(tenant, principal)
        if t is not None and t.queued:
            f = t.flows.get(principal)
            own = len(f.queue) if f is not None else 0
            # Other principals of the tenant alternate with this one.
            own += sum(min(len(o.queue), own + 1) for p, o in t.flows.items() if p != principal)
            mean = t.queued_cost / t.queued
            tag = t.vtime + own * mean / t.weight
            ahead += own
        else:
            tag = max(t.vtime if t is not None else 0.0, c.vclock)
        for name, o in c.tenants.items():
            if name == tenant or not o.queued:
                continue
            if o.vtime <= tag:
                mean = o.queued_cost / o.queued
                served = int((tag - o.vtime) * o.weight / mean) + 1 if mean > 0 else o.queued
                ahead += min(o.queued, served)
        return ahead

    def predict_wait(self, tenant: str, principal: str, cls: str, cost: float) -> float | None:
        """Predicted queue wait (seconds) of a new request; 0 when a slot is free; None before any slot was
        ever released (no turnover measured yet)."""
        limit = self.limit(cls)
        ahead = self.ahead_of(tenant, principal, cls, cost)
        free = limit - self.in_use
        if ahead < free:
            return 0.0
        if self.mean_hold is None or limit <= 0:
            return None
        # Slots turn over at limit / mean_hold per second; we need (ahead - free + 1) of them.
        return (ahead - max(free, 0) + 1) * self.mean_hold / limit

    def prune(self, keep: int = 10_000) -> None:
        """Forget idle tenants and principals whose clocks carry nothing (at or below the clock), and all idle
        ones past ``keep`` per class (forgiving their recent use), so bookkeeping stays bounded."""
        for c in self._order:
            for name in [n for n, t in c.tenants.items() if not t.queued]:
                t = c.tenants[name]
                for p in [p for p, f in t.flows.items() if not f.queue and f.vtime <= t.vclock]:
                    del t.flows[p]
                if not t.flows and t.vtime <= c.vclock:
                    del c.tenants[name]
            if len(c.tenants) > keep:
                for name in [n for n, t in c.tenants.items() if not t.queued]:
                    del c.tenants[name]

    # -- internals -------------------------------------------------------------------------------------------

    def _flow(self, c: _Class, w: Waiter) -> tuple[_Tenant, _Flow]:
        t = c.tenants.get(w.tenant)
        tw, pw = self._weight_of(w.tenant, w.principal)
        if t is None:
            t = c.tenants[w.tenant] = _Tenant(tw, vtime=c.vclock, vclock=0.0)
        else:
            t.weight = tw
        f = t.flows.get(w.principal)
        if f is None:
            f = t.flows[w.principal] = _Flow(pw, vtime=t.vclock)
        else:
            f.weight = pw
        return t, f

    def _charge(self, c: _Class, t: _Tenant, f: _Flow, w: Waiter) -> None:
        start = max(t.vtime, c.vclock)
        c.vclock = start
        t.vtime = start + w.cost / t.weight
        fstart = max(f.vtime, t.vclock)
        t.vclock = fstart
        f.vtime = fstart + w.cost / f.weight

    def _pop(self, c: _Class, tenant: str | None = None) -> Waiter:
        if tenant is not None:
            t = c.tenants[tenant]
        else:
            t = min((t for t in c.tenants.values() if t.queued), key=lambda t: t.vtime)
        f = min((f for f in t.flows.values() if f.queue), key=lambda f: f.vtime)
        w = f.queue.popleft()
        t.queued -= 1
        t.queued_cost -= w.cost
        c.queued -= 1
        self._charge(c, t, f, w)
        self._forget(c, t, w)
        return w

    def _forget(self, c: _Class, t: _Tenant, w: Waiter) -> None:
        """Drop idle bookkeeping that carries no information (a state at or below the clocks)."""
        f = t.flows.get(w.principal)
        if f is not None and not f.queue and f.vtime <= t.vclock:
            del t.flows[w.principal]
        if not t.queued and not t.flows and t.vtime <= c.vclock:
            del c.tenants[w.tenant]

    def _grant(self, w: Waiter, now: float) -> None:
        w.granted = True
        w.granted_at = now
        self.in_use += 1
        self.tenant_in_use[w.tenant] = self.tenant_in_use.get(w.tenant, 0) + 1
        self.granted_total += 1
        if w.notify is not None:
            w.notify(w)
