"""JwksCache: one issuer's signing keys, fetched over HTTP, parsed once, served from memory.

- Keys are fresh for ``jwks_ttl``; after that the next request starts a refresh in the background and keeps
  using the cached keys meanwhile (no network on the request path). Requests answered from the verified
  token cache count too (:meth:`JwksCache.tick`), so a key the provider removed stops working within a TTL.
- Refreshes are single-flight: a background refresh and requests waiting for an unknown ``kid`` share one
  fetch, and at most one fetch starts per ``jwks_min_refresh_interval``.
- ``generation`` moves only when a ``kid`` disappears or its key changes (a new key alone does not drop
  anything): tokens verified before that are verified again, against the keys now published.
- A token with an unknown ``kid`` triggers a refresh that the request waits for, but at most one fetch per
  ``jwks_min_refresh_interval``: forged kids cannot make the gateway hammer the identity provider.
- While the provider is unreachable the last good keys stay in use for ``jwks_max_stale`` past their TTL.
- With no usable key the cache fails closed: :class:`KeysUnavailable` (the verifier answers 503).

Only public, asymmetric signing keys are kept: symmetric (``oct``) keys and ``use: enc`` keys are dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

from gateway.settings import IssuerConfig, redact_url

log = logging.getLogger("gateway.auth.jwks")

MAX_DOCUMENT_BYTES = 1 << 20

# alg -> (kty, allowed curves or None)
_ALG_KEYS: dict[str, tuple[str, frozenset[str] | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
    "Ed25519": ("OKP", frozenset({"Ed25519"})),
}
_IMPORTERS = {"RSA": RSAKey, "EC": ECKey, "OKP": OKPKey}


def url_is_safe(url: str) -> bool:
    """https, or plain http only to a loopback address (a sidecar, tests)."""
    u = urlsplit(url)
    if u.scheme == "https":
        return True
    host = (u.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KeysUnavailable(Exception):
    """No usable key can be had right now (provider unreachable, nothing cached): fail closed."""


class UnknownKey(Exception):
    """The keys are current, but none matches the token's ``kid``/``alg``."""


def key_fits(key: Key, alg: str) -> bool:
    want = _ALG_KEYS.get(alg)
    if want is None or key.key_type != want[0]:
        return False
    if want[1] is not None and key.get("crv") not in want[1]:
        return False
    designed = key.get("alg")
    return designed is None or designed == alg


class JwksCache:
    def __init__(
        self,
        cfg: IssuerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._by_kid: dict[str, list[Key]] = {}
        self._all: list[Key] = []
        self._fingerprint = ""
        self.fetched_at: float | None = None  # last successful fetch (clock time)
        self._last_attempt = -math.inf
        self._last_ok = False
        self._attempts = 0
        self.fetches = 0  # HTTP fetches of the JWKS (tests and metrics look at it)
        # The fetch in progress, if any: every refresh() joins it (single-flight).
        self._inflight: asyncio.Future[bool] | None = None
        self._jwks_url = cfg.jwks_url
        self.discovery_url = cfg.discovery_url or cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
        # Bumped whenever a key is removed or changed, so callers drop anything verified with old keys.
        self.generation = 0
        for url in (cfg.jwks_url, None if cfg.jwks_url else self.discovery_url):
            if url is not None and not url_is_safe(url):
                log.warning(
                    "signing keys fetched over plain http from a non-loopback host: anyone on the path can "
                    "substitute keys and mint accepted tokens; use https",
                    extra={"issuer": cfg.issuer, "url": redact_url(url)},
                )

    # -- lookup (the hot path) -------------------------------------------------------------------------------

    def tick(self) -> float:
        """Past the TTL: start a background refresh (or, past max_stale, drop the keys). Returns now."""
        now = self._clock()
        if self.fetched_at is not None and now - self.fetched_at > self.cfg.jwks_ttl:
            if now - self.fetched_at > self.cfg.jwks_ttl + self.cfg.jwks_max_stale:
                self._drop_keys()  # too old to trust: behave as if never fetched
            else:
                self._refresh_in_background(now)
        return now

    async def key_for(self, kid: str | None, alg: str) -> Key:
        """The key to verify a token with header ``kid``/``alg``; refreshes only when it must."""
        now = self.tick()
        key = self._find(kid, alg)
        if key is not None:
            return key
        # Unknown kid (or nothing cached yet): join the fetch in flight, or start one if allowed; look again.
        if self._inflight is not None or now - self._last_attempt >= self.cfg.jwks_min_refresh_interval:
            await self.refresh()
            key = self._find(kid, alg)
            if key is not None:
                return key
        if not self._last_ok or self.fetched_at is None:
            raise KeysUnavailable(f"signing keys of {self.cfg.issuer} cannot be fetched right now")
        raise UnknownKey("no signing key matches the token's key id and algorithm")

    def _find(self, kid: str | None, alg: str) -> Key | None:
        if kid is not None:
            for k in self._by_kid.get(kid, ()):
                if key_fits(k, alg):
                    return k
            return None
        fits = [k for k in self._all if key_fits(k, alg)]
        return fits[0] if len(fits) == 1 else None

    def _drop_keys(self) -> None:
        if self._all:
            log.warning("dropping stale signing keys", extra={"issuer": self.cfg.issuer})
        self._by_kid, self._all, self.fetched_at, self._fingerprint = {}, [], None, ""
        self.generation += 1

    # -- refresh ---------------------------------------------------------------------------------------------

    def _refresh_in_background(self, now: float) -> None:
        if self._inflight is not None or now - self._last_attempt < self.cfg.jwks_min_refresh_interval:
            return
        self._start_fetch()

    def _start_fetch(self) -> asyncio.Future[bool]:
        # Stamped when the fetch is started, not when it runs: a request arriving in between joins it.
        self._attempts += 1
        self._last_attempt = self._clock()
        fut = asyncio.ensure_future(self._fetch_and_install())
        self._inflight = fut
        fut.add_done_callback(self._fetch_done)
        return fut

    def _fetch_done(self, fut: asyncio.Future[bool]) -> None:
        if self._inflight is fut:
            self._inflight = None
        if not fut.cancelled():
            fut.exception()  # retrieved: _fetch_and_install never raises, this only silences asyncio

    async def refresh(self) -> bool:
        """Fetch the key set now, or join the fetch in flight (single-flight). True if it worked."""
        fut = self._inflight if self._inflight is not None else self._start_fetch()
        # A waiter that goes away (its client disconnected) does not cancel the fetch the others share.
        return await asyncio.shield(fut)

    async def _fetch_and_install(self) -> bool:
        try:
            doc = await self._fetch_jwks()
            self._install(doc)
            self._last_ok = True
        except Exception as e:  # network, HTTP status, bad document: keep what we have
            self._last_ok = False
            log.warning(
                "cannot refresh signing keys",
                extra={"issuer": self.cfg.issuer, "error": f"{type(e).__name__}: {e}"[:300]},
            )
        return self._last_ok

    async def _get_json(self, url: str) -> Any:
        if self._session is None:
            self._session = self._session_factory() if self._session_factory else aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.cfg.http_timeout)
        async with self._session.get(url, timeout=timeout, headers={"accept": "application/json"}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {redact_url(url)} answered {resp.status}")
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise RuntimeError(f"GET {redact_url(url)}: document larger than {MAX_DOCUMENT_BYTES} bytes")
            return json.loads(body)

    async def _fetch_jwks(self) -> Any:
        if self._jwks_url is None:
            meta = await self._get_json(self.discovery_url)
            if not isinstance(meta, dict) or not isinstance(meta.get("jwks_uri"), str):
                raise RuntimeError("discovery document has no jwks_uri")
            # OpenID Connect Discovery 1.0 §4.3: the issuer in the document must be the one we trust.
            if meta.get("issuer") != self.cfg.issuer:
                raise RuntimeError(f"discovery document names issuer {meta.get('issuer')!r}")
            self._jwks_url = meta["jwks_uri"]
        try:
            doc = await self._get_json(self._jwks_url)
        except Exception:
            if self.cfg.jwks_url is None:
                self._jwks_url = None  # rediscover next time, the provider may have moved its keys
            raise
        self.fetches += 1
        return doc

    def _install(self, doc: Any) -> None:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise RuntimeError("JWKS document has no 'keys' list")
        by_kid: dict[str, list[Key]] = {}
        all_keys: list[Key] = []
        for raw in doc["keys"]:
            if not isinstance(raw, dict):
                continue
            importer = _IMPORTERS.get(raw.get("kty"))  # symmetric "oct" keys are never accepted
            if importer is None or raw.get("use", "sig") != "sig":
                continue
            public = {k: v for k, v in raw.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
            try:
                key = importer.import_key(public)
            except Exception as e:
                log.warning("skipping an unusable JWKS key", extra={"issuer": self.cfg.issuer, "kid": raw.get("kid"), "error": str(e)[:200]})
                continue
            all_keys.append(key)
            if isinstance(raw.get("kid"), str):
                by_kid.setdefault(raw["kid"], []).append(key)
        if not all_keys:
            raise RuntimeError("JWKS document holds no usable signing key")
        fingerprint = json.dumps(doc["keys"], sort_keys=True)
        changed = fingerprint != self._fingerprint
        old_all, old_by_kid = self._all, self._by_kid
        self._by_kid, self._all, self._fingerprint = by_kid, all_keys, fingerprint
        self.fetched_at = self._clock()
        if changed:
            # Tokens verified with a key that is gone (or changed) must not pass from the verified-token
            # cache any more: moving the generation drops those entries. A key that was only added does not.
            new_keys = {k.thumbprint() for k in all_keys}
            removed = [k for k in old_all if k.thumbprint() not in new_keys]
            kid_gone = any(kid not in by_kid for kid in old_by_kid)
            if removed or kid_gone:
                self.generation += 1
            log.info("signing keys loaded", extra={"issuer": self.cfg.issuer, "kids": sorted(by_kid)})

    async def close(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
