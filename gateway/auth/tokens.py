"""JWT bearer tokens: verified against configured issuers' JWKS, mapped to a :class:`Principal`.

Per token, in this order (cheap rejections first, the signature before any claim is trusted):

1. size limit, exactly three segments, a JSON header whose ``alg`` is on the accepted (asymmetric) list;
2. the unverified ``iss`` picks the issuer configuration (unknown issuer → 401);
3. the issuer's :class:`JwksCache` gives the key for ``kid``/``alg`` (kty and curve must fit the alg);
4. the signature is verified with joserfc (the Authlib project's JOSE library; ``authlib.jose`` is
   deprecated in its favour);
5. ``exp``, ``iat`` (required), ``nbf`` (when present), ``iss`` and ``aud`` are checked with the leeway;
6. subject, tenant and scopes/roles/groups are read from the configured claims; ``role_models`` turns the
   scopes into the models the principal may use.

Failures are 401 with ``WWW-Authenticate: Bearer error="invalid_token"``; no usable key at all is 503.
The token itself never appears in an error message or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from joserfc.errors import (
    ClaimError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidHeaderValueError,
    JoseError,
    MissingClaimError,
    MissingCritHeaderError,
    UnsupportedAlgorithmError,
    UnsupportedHeaderError,
)
from joserfc.jws import JWSAlgModel, JWSRegistry, extract_compact, validate_compact
from joserfc.jwt import JWTClaimsRegistry

from gateway.auth.authenticator import unauthorized
from gateway.auth.jwks import JwksCache, KeysUnavailable, UnknownKey
from gateway.auth.principal import Principal
from gateway.errors import ApiError
from gateway.settings import AuthSettings, IssuerConfig

log = logging.getLogger("gateway.auth.tokens")


class _IssuerAlgorithms(JWSRegistry):
    """The issuer's allowed algorithms, without joserfc's per-call ``SecurityWarning`` for "EdDSA".

    RFC 9864 deprecates the polymorphic "EdDSA" name in favour of "Ed25519" (also accepted); IdPs still issue
    "EdDSA", which the operator enables deliberately, so warning on every request is only cost and noise.
    """

    def get_alg(self, name: str) -> JWSAlgModel:
        if not self.allowed or name not in self.allowed or name not in self.algorithms:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        return self.algorithms[name]


def _unavailable(issuer: str) -> ApiError:
    return ApiError(
        503,
        "The identity provider's signing keys cannot be loaded right now; retry shortly.",
        code="auth_unavailable",
        headers={"retry-after": "5"},
        reason="auth_unavailable",
    )


_CLAIM_MESSAGES = {
    "nbf": "The token is not valid yet (nbf).",
    "iat": "The token's issue time (iat) is invalid or in the future.",
    "aud": "The token is not meant for this service (aud).",
    "iss": "The token's issuer is not trusted.",
    "exp": "The token's expiry (exp) is invalid.",
}


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """``claims[path]``; a dotted path reaches into objects (``realm_access.roles``) unless the
    exact name exists (Azure/Okta use URLs with dots as claim names)."""
    if path in claims:
        return claims[path]
    cur: Any = claims
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _values(v: Any) -> list[str]:
    if isinstance(v, str):
        return v.split()
    if isinstance(v, list):
        return [x for x in v if isinstance(x, str)]
    return []


class IssuerVerifier:
    """Everything needed to verify one issuer's tokens, built once."""

    def __init__(self, cfg: IssuerConfig, role_models: dict[str, list[str]], cache: JwksCache) -> None:
        self.cfg = cfg
        self.cache = cache
        self.algorithms = frozenset(cfg.algorithms)
        # Non-critical extra header fields (x5t, nonce, ...) are tolerated; "crit" ones are still enforced.
        self.registry = _IssuerAlgorithms(algorithms=list(cfg.algorithms), strict_check_header=False)
        self.role_models = {k: frozenset(v) for k, v in (cfg.role_models if cfg.role_models is not None else role_models).items()}
        self._everyone = self.role_models.get("*", frozenset())
        self.claims = JWTClaimsRegistry(
            leeway=cfg.leeway,
            iss={"essential": True, "value": cfg.issuer},
            aud={"essential": True, "values": list(cfg.audience)},
            exp={"essential": True},
            iat={"essential": True},
        )

    def principal(self, claims: dict[str, Any]) -> Principal:
        sub = claim_at(claims, self.cfg.subject_claim)
        if not isinstance(sub, str) or not sub:
            raise unauthorized(f"The token has no '{self.cfg.subject_claim}' claim.")
        tenant = claim_at(claims, self.cfg.tenant_claim) if self.cfg.tenant_claim else None
        scopes: set[str] = set()
        for name in self.cfg.scope_claims:
            scopes.update(_values(claim_at(claims, name)))
        models = set(self._everyone)
        for s in scopes:
            granted = self.role_models.get(s)
            if granted:
                models |= granted
        return Principal(
            subject=sub,
            tenant=tenant if isinstance(tenant, str) and tenant else self.cfg.default_tenant,
            kind="jwt",
            key_id=self.cfg.issuer,
            models=frozenset(models),
            scopes=frozenset(scopes),
        )


class JwtVerifier:
    """The Authenticator's ``token_verifier``: ``await verify(token) -> Principal`` or an ApiError."""

    def __init__(
        self,
        issuers: list[IssuerVerifier],
        *,
        max_token_bytes: int = 8192,
        cache_size: int = 1024,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.issuers = {i.cfg.issuer: i for i in issuers}
        self.algorithms = frozenset().union(*(i.algorithms for i in issuers)) if issuers else frozenset()
        self.max_token_bytes = max_token_bytes
        self.cache_size = cache_size
        self._now = now
        # token -> (principal, exp, issuer, key generation). A hit skips the signature check only while
        # the token is unexpired and the issuer's key set is unchanged since it was verified.
        self._verified: dict[str, tuple[Principal, float, IssuerVerifier, int]] = {}

    @classmethod
    def from_settings(cls, auth: AuthSettings, **cache_kwargs: Any) -> JwtVerifier:
        verifiers = [IssuerVerifier(c, auth.role_models, JwksCache(c, **cache_kwargs)) for c in auth.issuers]
        return cls(verifiers, max_token_bytes=auth.max_token_bytes, cache_size=auth.verified_token_cache_size)

    async def start(self) -> None:
        """Load every issuer's keys once (failures are logged; requests retry under the rate limit)."""
        await asyncio.gather(*(i.cache.refresh() for i in self.issuers.values()))

    async def close(self) -> None:
        for i in self.issuers.values():
            await i.cache.close()

    async def verify(self, token: str) -> Principal:
        hit = self._verified.get(token)
        if hit is not None:
            principal, exp, iv, gen = hit
            # Past the TTL, a cache hit starts the background refresh too (a removed key must stop working).
            iv.cache.tick()
            if exp > self._now() - iv.cfg.leeway and gen == iv.cache.generation:
                return principal
            del self._verified[token]
        if len(token) > self.max_token_bytes:
            raise unauthorized("The token is too large.")
        try:
            raw = token.encode("ascii")
            obj = extract_compact(raw)
        except (UnicodeEncodeError, JoseError, ValueError):
            raise unauthorized("The token is malformed.") from None
        header = obj.protected
        if not isinstance(header, dict):
            raise unauthorized("The token is malformed.")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise unauthorized(f"The token's algorithm {str(alg)[:20]!r} is not accepted.")
        if header.get("b64") is False:
            raise unauthorized("The token is malformed (unencoded payload).")
        try:
            claims = json.loads(obj.payload)
        except ValueError:
            raise unauthorized("The token's payload is not JSON.") from None
        if not isinstance(claims, dict):
            raise unauthorized("The token's payload is not a JSON object.")
        iss = claims.get("iss")
        iv = self.issuers.get(iss) if isinstance(iss, str) else None
        if iv is None:
            raise unauthorized("The token's issuer is not trusted.")
        if alg not in iv.algorithms:
            raise unauthorized(f"The token's algorithm {alg!r} is not accepted for this issuer.")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise unauthorized("The token's key id is malformed.")
        gen = iv.cache.generation
        try:
            key = await iv.cache.key_for(kid, alg)
        except KeysUnavailable:
            raise _unavailable(iv.cfg.issuer) from None
        except UnknownKey:
            raise unauthorized("The token was signed with an unknown key.") from None
        try:
            # crit headers, alg allowed for this issuer, key type fits the alg, then the signature.
            ok = validate_compact(obj, key, registry=iv.registry)
        except (MissingCritHeaderError, UnsupportedHeaderError, InvalidHeaderValueError):
            raise unauthorized("The token's header has fields this service does not support.") from None
        except (JoseError, ValueError, TypeError):
            ok = False
        if not ok:
            raise unauthorized("The token's signature is invalid.")
        try:
            iv.claims.validate(claims)
        except ExpiredTokenError:
            raise unauthorized("The token has expired.") from None
        except MissingClaimError as e:
            raise unauthorized(f"The token lacks the required claim(s) {e.claim}.") from None
        except InvalidClaimError as e:
            raise unauthorized(_CLAIM_MESSAGES.get(e.claim, f"The token's '{e.claim}' claim is invalid.")) from None
        except ClaimError as e:
            raise unauthorized(f"The token's '{e.claim}' claim is invalid.") from None
        principal = iv.principal(claims)
        if self.cache_size > 0 and gen == iv.cache.generation:
            if len(self._verified) >= self.cache_size:
                self._verified.pop(next(iter(self._verified)))
            self._verified[token] = (principal, float(claims["exp"]), iv, gen)
        return principal
