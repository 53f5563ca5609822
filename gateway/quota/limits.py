"""Which limits apply to a request, what it reserves, and how a decision becomes OpenAI's headers.

The algorithm (both backends) is GCRA, the "generic cell rate algorithm": each limited resource keeps one
number, its theoretical arrival time (TAT). A limit of L per minute has an emission interval T = 60 s / L;
taking ``n`` units moves TAT to ``max(TAT, now) + n*T`` and is allowed while that stays within one minute of
now. So a full bucket allows a burst of L, then one unit every T: a smooth window, never the double burst of
fixed windows. Settling a reservation moves TAT by ``(real - reserved) * T`` (a refund or an overdraft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gateway.quota.config import Limits, QuotaSettings

PERIOD = 60.0
# Allowance (seconds) for float rounding: the same as the clock being this much ahead.
TOLERANCE = 0.001


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limited scope (a principal, a tenant, either for one model): its key and its limits."""

    key: str
    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    # Derived once: the resource keys, GCRA intervals and the constant x-ratelimit-limit-* headers.
    req_key: str = field(init=False, repr=False, compare=False)
    tok_key: str = field(init=False, repr=False, compare=False)
    req_interval: float = field(init=False, repr=False, compare=False)
    tok_interval: float = field(init=False, repr=False, compare=False)
    req_limit_header: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)
    tok_limit_header: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "req_key", self.key + ":r")
        put(self, "tok_key", self.key + ":t")
        put(self, "req_interval", PERIOD / self.rpm if self.rpm else 0.0)
        put(self, "tok_interval", PERIOD / self.tpm if self.tpm else 0.0)
        put(self, "req_limit_header", (b"x-ratelimit-limit-requests", b"%d" % self.rpm))
        put(self, "tok_limit_header", (b"x-ratelimit-limit-tokens", b"%d" % self.tpm))


@dataclass(slots=True, init=False)
class BucketState:
    """Remaining capacity of one bucket after a decision; reset = seconds until it is full again."""

    req_remaining: int
    req_reset: float
    tok_remaining: int
    tok_reset: float

    # Written out (init=False): a generated __init__ would run as interpreted code in a compiled module.
    def __init__(
        self, req_remaining: int = -1, req_reset: float = 0.0, tok_remaining: int = -1, tok_reset: float = 0.0
    ) -> None:
        self.req_remaining = req_remaining
        self.req_reset = req_reset
        self.tok_remaining = tok_remaining
        self.tok_reset = tok_reset


@dataclass(slots=True, init=False)
class Decision:
    allowed: bool
    # requests | tokens | concurrency when refused
    reason: str | None
    # Seconds until a retry could succeed (refusals).
    retry_after: float
    states: list[BucketState]

    # Written out (init=False): a generated __init__ would run as interpreted code in a compiled module.
    def __init__(
        self, allowed: bool, reason: str | None, retry_after: float, states: list[BucketState]
    ) -> None:
        self.allowed = allowed
        self.reason = reason
        self.retry_after = retry_after
        self.states = states


class LimitTable:
    """Resolves the buckets of a (principal, tenant, model), cached: configuration does not change at run time."""

    def __init__(self, settings: QuotaSettings) -> None:
        self.settings = settings
        self._cache: dict[tuple[str, tuple[str, ...], str, str], tuple[Bucket, ...]] = {}

    def buckets(self, pid: str, names: tuple[str, ...], tenant: str, model: str) -> tuple[Bucket, ...]:
        """The buckets of principal ``pid`` (namespaced by credential kind, ``Principal.id``), whose limits are
        the first of ``names`` (``Principal.quota_names``) found in ``principals``, else the default."""
        ck = (pid, names, tenant, model)
        hit = self._cache.get(ck)
        if hit is not None:
            return hit
        s = self.settings
        out: list[Bucket] = []
        pname = next((n for n in names if n in s.principals), None)
        scope = s.principals.get(pname) if pname is not None else None
        base: Limits = scope if scope is not None else s.default
        # Named after the caller's namespaced id: a token's subject never shares an API key's bucket.
        _add(out, f"p:{pid}", base)
        if scope is not None and model in scope.models:
            _add(out, f"p:{pid}:m:{model}", scope.models[model])
        tscope = s.tenants.get(tenant)
        if tscope is not None:
            _add(out, f"t:{tenant}", tscope)
            if model in tscope.models:
                _add(out, f"t:{tenant}:m:{model}", tscope.models[model])
        result = tuple(out)
        if len(self._cache) < 100_000:
            self._cache[ck] = result
        return result


def _add(out: list[Bucket], key: str, lim: Limits) -> None:
    if not lim.empty:
        out.append(Bucket(key, lim.rpm, lim.tpm, lim.concurrency))


def estimate_prompt_tokens(prompt_chars: int, messages: int, settings: QuotaSettings) -> int:
    return math.ceil(prompt_chars / settings.chars_per_token) + messages * settings.tokens_per_message


def gcra_state(tat: float, now: float, interval: float) -> tuple[int, float]:
    """(remaining units, seconds until full) of a GCRA bucket whose TAT is ``tat``."""
    used = max(tat - now, 0.0)
    return max(int((PERIOD + TOLERANCE - used) / interval), 0), used


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(int(round(seconds * 1000)), 1)}ms"
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s = rem / 1000
    sec = f"{s:.3f}".rstrip("0").rstrip(".") + "s"
    if h:
        return f"{h}h{m}m{sec}"
    if m:
        return f"{m}m{sec}"
    return sec


def _reset_bytes(seconds: float) -> bytes:
    """:func:`format_reset` as header bytes; below a second (the usual case) without the general path."""
    if 0 < seconds < 0.9995:
        return b"%dms" % max(int(round(seconds * 1000)), 1)
    return format_reset(seconds).encode()


def parse_reset(text: str) -> float:
    """Inverse of :func:`format_reset` (for clients and tests)."""
    total, num = 0.0, ""
    i = 0
    while i < len(text):
        c = text[i]
        if c.isdigit() or c == ".":
            num += c
        elif text.startswith("ms", i):
            total += float(num) / 1000
            num = ""
            i += 1
        else:
            total += float(num) * {"h": 3600, "m": 60, "s": 1}[c]
            num = ""
        i += 1
    return total


def rate_limit_headers(buckets: tuple[Bucket, ...], states: list[BucketState]) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers, from the most constrained bucket for requests and for tokens."""
    rb = tb = -1
    if len(buckets) == 1:  # the usual case: one bucket, nothing to compare
        b = buckets[0]
        rb = 0 if b.rpm else -1
        tb = 0 if b.tpm else -1
    else:
        for i, b in enumerate(buckets):
            st = states[i]
            if b.rpm and (rb < 0 or st.req_remaining < states[rb].req_remaining):
                rb = i
            if b.tpm and (tb < 0 or st.tok_remaining < states[tb].tok_remaining):
                tb = i
    out: list[tuple[bytes, bytes]] = []
    if rb >= 0:
        b, st = buckets[rb], states[rb]
        out.append(b.req_limit_header)
        out.append((b"x-ratelimit-remaining-requests", b"%d" % min(max(st.req_remaining, 0), b.rpm)))
        out.append((b"x-ratelimit-reset-requests", _reset_bytes(st.req_reset)))
    if tb >= 0:
        b, st = buckets[tb], states[tb]
        out.append(b.tok_limit_header)
        out.append((b"x-ratelimit-remaining-tokens", b"%d" % min(max(st.tok_remaining, 0), b.tpm)))
        out.append((b"x-ratelimit-reset-tokens", _reset_bytes(st.tok_reset)))
    return out
