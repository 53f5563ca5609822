"""The Redis-backed GCRA limiter: every gateway replica sees the same counters.

Each admission is ONE atomic Lua script (check every bucket, then commit all or nothing) and each settlement
at most one more; the clock is Redis's own (``TIME``), so replicas with skewed clocks still agree. Values are
integer microseconds. Concurrency slots are sorted-set members scored by their lease expiry, so a replica that
dies mid-request leaks nothing for longer than ``concurrency_lease``.

The calls go through the pipelined RESP client of ``gateway/quota/resp.py`` (``EVALSHA``, re-sent as ``EVAL``
after a Redis restart); the acquire call of a set of buckets is packed once and reused, only the cost and the
lease id change per request.

All keys of one request are passed to the script; on Redis Cluster they would have to share a hash slot
(e.g. a ``{quota}`` tag in ``key_prefix``), which puts all quota state on one shard.
"""

from __future__ import annotations

from gateway.quota.limits import PERIOD, TOLERANCE, Bucket, BucketState, Decision
from gateway.quota.resp import RedisClient, Script, bulk

# KEYS: three per bucket: requests TAT, tokens TAT, lease set.
# ARGV: period_us, tolerance_us, cost, lease id, lease_us, then rpm, tpm, max_concurrent per bucket (0 = none).
# Returns {allowed, reason (0 none, 1 requests, 2 tokens, 3 concurrency), retry_us,
#          then per bucket: req_remaining, req_reset_us, tok_remaining, tok_reset_us}.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local P = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local lease = ARGV[4]
local lease_us = tonumber(ARGV[5])
local n = #KEYS / 3
local reason = 0
local retry = 0
local before = {}
local after = {}
local writes = {}
local function state(tat, interval)
  local used = tat - now
  if used < 0 then used = 0 end
  local rem = math.floor((P + tol - used) / interval)
  if rem < 0 then rem = 0 end
  return rem, used
end
local function deny(code, wait)
  if reason == 0 then reason = code end
  if wait > retry then retry = wait end
end
for i = 1, n do
  local rpm = tonumber(ARGV[3 + 3 * i])
  local tpm = tonumber(ARGV[4 + 3 * i])
  local conc = tonumber(ARGV[5 + 3 * i])
  local br, brs, bt, bts, ar, ars, at, ats = -1, 0, -1, 0, -1, 0, -1, 0
  if rpm > 0 then
    local k = KEYS[3 * i - 2]
    local interval = P / rpm
    local cur = tonumber(redis.call('GET', k) or now)
    if cur < now then cur = now end
    local new = cur + interval
    br, brs = state(cur, interval)
    ar, ars = state(new, interval)
    if new - now > P + tol then deny(1, new - now - P) end
    writes[#writes + 1] = k
    writes[#writes + 1] = new
  end
  if tpm > 0 then
    local k = KEYS[3 * i - 1]
    local interval = P / tpm
    local cur = tonumber(redis.call('GET', k) or now)
    if cur < now then cur = now end
    local new = cur + cost * interval
    bt, bts = state(cur, interval)
    at, ats = state(new, interval)
    if new - now > P + tol then deny(2, new - now - P) end
    if cost > 0 then
      writes[#writes + 1] = k
      writes[#writes + 1] = new
    end
  end
  if conc > 0 then
    local k = KEYS[3 * i]
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    if redis.call('ZCARD', k) >= conc then deny(3, 1000000) end
  end
  local j = #before
  before[j + 1], before[j + 2], before[j + 3], before[j + 4] = br, brs, bt, bts
  after[j + 1], after[j + 2], after[j + 3], after[j + 4] = ar, ars, at, ats
end
local out = {0, reason, math.floor(retry)}
local states = before
if reason == 0 then
  out[1] = 1
  states = after
  for j = 1, #writes, 2 do
    local v = writes[j + 1]
    redis.call('SET', writes[j], string.format('%.0f', v), 'PX', math.floor((v - now) / 1000) + 1000)
  end
  for i = 1, n do
    if tonumber(ARGV[5 + 3 * i]) > 0 then
      local k = KEYS[3 * i]
      redis.call('ZADD', k, now + lease_us, lease)
      redis.call('PEXPIRE', k, math.floor(lease_us / 1000) + 1000)
    end
  end
end
for j = 1, #states do out[3 + j] = math.floor(states[j]) end
return out
"""

# KEYS: the tokens TATs to correct, then the lease sets to leave.
# ARGV: period_us, lease id, token delta (real - reserved), number of token keys, then tpm per token key.
SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local P = tonumber(ARGV[1])
local lease = ARGV[2]
local delta = tonumber(ARGV[3])
local ntok = tonumber(ARGV[4])
for i = 1, ntok do
  local k = KEYS[i]
  local interval = P / tonumber(ARGV[4 + i])
  local cur = redis.call('GET', k)
  local v = nil
  if delta > 0 then
    local base = tonumber(cur or now)
    if base < now then base = now end
    v = base + delta * interval
  elseif cur then
    v = tonumber(cur) + delta * interval
  end
  if v and v > now then
    redis.call('SET', k, string.format('%.0f', v), 'PX', math.floor((v - now) / 1000) + 1000)
  elseif cur then
    redis.call('DEL', k)
  end
end
for i = ntok + 1, #KEYS do redis.call('ZREM', KEYS[i], lease) end
return 1
"""

_US = 1_000_000
_PERIOD_US = bulk(int(PERIOD * _US))
_TOLERANCE_US = bulk(int(TOLERANCE * _US))
_REASONS = (None, "requests", "tokens", "concurrency")


class _AcquirePlan:
    """The acquire call of one set of buckets, packed once: only the cost and the lease id vary per request."""

    __slots__ = ("head", "tail", "nparts")

    def __init__(self, keys: list[str], limits: list[int], lease_us: int) -> None:
        self.head = bulk(len(keys)) + b"".join(bulk(k) for k in keys) + _PERIOD_US + _TOLERANCE_US
        self.tail = bulk(lease_us) + b"".join(bulk(v) for v in limits)
        self.nparts = 1 + len(keys) + 5 + len(limits)


class RedisLimiter:
    """GCRA on Redis through the pipelined client of ``gateway/quota/resp.py`` (one ``EVALSHA`` to acquire,
    at most one to settle)."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "llmgw:quota:",
        timeout: float = 1.0,
        lease_seconds: float = 900.0,
        connections: int = 1,
        max_pending: int = 4096,
    ) -> None:
        # No retries: a failure is the admission's to handle (fall back or refuse, replay settlements later).
        self.client = RedisClient(url, timeout=timeout, connections=connections, max_pending=max_pending)
        self.prefix = prefix
        self.lease_us = int(lease_seconds * _US)
        self._acquire = Script(ACQUIRE_LUA)
        self._settle = Script(SETTLE_LUA)
        self._plans: dict[tuple[Bucket, ...], _AcquirePlan] = {}

    def _plan(self, buckets: tuple[Bucket, ...]) -> _AcquirePlan:
        plan = self._plans.get(buckets)
        if plan is None:
            keys: list[str] = []
            limits: list[int] = []
            for b in buckets:
                base = self.prefix + b.key
                keys += (base + ":r", base + ":t", base + ":c")
                limits += (b.rpm, b.tpm, b.concurrency)
            plan = _AcquirePlan(keys, limits, self.lease_us)
            if len(self._plans) < 100_000:
                self._plans[buckets] = plan
        return plan

    async def acquire(self, buckets: tuple[Bucket, ...], cost: int, lease: str) -> Decision:
        plan = self._plan(buckets)
        res = await self.client.evalsha(
            self._acquire, plan.head + bulk(cost) + bulk(lease) + plan.tail, plan.nparts
        )
        states = [
            BucketState(res[j], res[j + 1] / _US, res[j + 2], res[j + 3] / _US) for j in range(3, len(res), 4)
        ]
        return Decision(res[0] == 1, _REASONS[res[1]], res[2] / _US, states)

    async def release(self, buckets: tuple[Bucket, ...], lease: str, token_delta: int) -> None:
        tok = [b for b in buckets if b.tpm] if token_delta else []
        conc = [b for b in buckets if b.concurrency]
        if not tok and not conc:
            return
        keys = [self.prefix + b.key + ":t" for b in tok] + [self.prefix + b.key + ":c" for b in conc]
        body = (
            bulk(len(keys))
            + b"".join(bulk(k) for k in keys)
            + _PERIOD_US
            + bulk(lease)
            + bulk(token_delta)
            + bulk(len(tok))
            + b"".join(bulk(b.tpm) for b in tok)
        )
        await self.client.evalsha(self._settle, body, 1 + len(keys) + 4 + len(tok))

    async def close(self) -> None:
        await self.client.close()
