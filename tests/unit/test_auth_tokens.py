"""JwtVerifier + JwksCache against a real token issuer over HTTP (in-process verifier, real sockets)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth.principal import Principal
from gateway.auth.tokens import JwtVerifier, claim_at
from gateway.errors import ApiError
from gateway.settings import AuthSettings, GatewaySettings
from tests.fixtures_auth import ALGS, AUDIENCE, JsonWebKey, TokenIssuer

ROLE_MODELS = {"llm.all": ["*"], "llm.tiny": ["tiny"], "llm.small": ["small"], "gpu-users": ["big"]}


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_verifier(issuer: TokenIssuer, clock: FakeClock | None = None, **cfg) -> JwtVerifier:
    settings = AuthSettings(issuers=[issuer.issuer_config(**cfg)], role_models=ROLE_MODELS)
    kwargs = {"clock": clock} if clock is not None else {}
    return JwtVerifier.from_settings(settings, **kwargs)


def cache_of(v: JwtVerifier):
    return next(iter(v.issuers.values())).cache


async def expect_401(v: JwtVerifier, token: str, fragment: str) -> ApiError:
    with pytest.raises(ApiError) as ei:
        await v.verify(token)
    e = ei.value
    assert e.status == 401, e.message
    assert e.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert fragment in e.message, e.message
    assert token not in e.message
    return e


@pytest.fixture
async def verifier(token_issuer: TokenIssuer):
    v = make_verifier(token_issuer)
    yield v
    await v.close()


@pytest.mark.parametrize("alg", ALGS)
async def test_valid_token_each_algorithm(verifier: JwtVerifier, token_issuer: TokenIssuer, alg: str) -> None:
    p = await verifier.verify(token_issuer.mint(alg, sub=f"svc-{alg}", scope="llm.tiny gpu-users"))
    assert isinstance(p, Principal)
    assert (p.subject, p.tenant, p.kind, p.key_id) == (f"svc-{alg}", "team-jwt", "jwt", token_issuer.issuer)
    assert p.scopes == {"llm.tiny", "gpu-users"}
    assert p.models == {"tiny", "big"}
    assert p.may_use("tiny") and not p.may_use("small")


async def test_discovery_then_jwks_fetched_once(token_issuer: TokenIssuer) -> None:
    before = dict(token_issuer.hits)
    v = make_verifier(token_issuer)
    try:
        for _ in range(5):
            for alg in ALGS:
                await v.verify(token_issuer.mint(alg))
    finally:
        await v.close()
    assert token_issuer.hits["discovery"] - before["discovery"] == 1
    assert token_issuer.hits["jwks"] - before["jwks"] == 1


@pytest.mark.parametrize(
    "claims, fragment",
    [
        ({"exp": -3600}, "expired"),
        ({"nbf": +3600}, "not valid yet"),
        ({"iat": +3600}, "issue time"),
        ({"iat": None}, "iat"),
        ({"exp": None}, "exp"),
        ({"aud": "some-other-api"}, "not meant for this service"),
        ({"aud": None}, "aud"),
        ({"iss": "https://evil.example/realms/test"}, "issuer is not trusted"),
        ({"sub": None}, "'sub'"),
    ],
    ids=["expired", "not-yet-valid", "iat-future", "no-iat", "no-exp", "wrong-aud", "no-aud", "wrong-iss", "no-sub"],
)
async def test_bad_claims_rejected(verifier: JwtVerifier, token_issuer: TokenIssuer, claims, fragment) -> None:
    import time

    now = int(time.time())
    fixed = {k: (now + v if k in ("exp", "nbf", "iat") and v is not None else v) for k, v in claims.items()}
    await expect_401(verifier, token_issuer.mint("ES256", **fixed), fragment)


async def test_leeway_accepts_small_skew(token_issuer: TokenIssuer) -> None:
    import time

    v = make_verifier(token_issuer, leeway=60)
    try:
        p = await v.verify(token_issuer.mint("RS256", exp=int(time.time()) - 20, nbf=int(time.time()) + 20))
        assert p.subject == "user-1"
    finally:
        await v.close()


async def test_alg_none_rejected(verifier: JwtVerifier, token_issuer: TokenIssuer) -> None:
    await expect_401(verifier, token_issuer.mint_unsigned(), "'none' is not accepted")


async def test_hs256_with_public_key_rejected(verifier: JwtVerifier, token_issuer: TokenIssuer) -> None:
    await expect_401(verifier, token_issuer.mint_hs256_with_public_key(), "'HS256' is not accepted")


async def test_alg_not_allowed_for_issuer(token_issuer: TokenIssuer) -> None:
    v = make_verifier(token_issuer, algorithms=["RS256"])
    try:
        assert (await v.verify(token_issuer.mint("RS256"))).subject == "user-1"
        await expect_401(v, token_issuer.mint("EdDSA"), "not accepted")
    finally:
        await v.close()


async def test_tampered_payload_rejected(verifier: JwtVerifier, token_issuer: TokenIssuer) -> None:
    from tests.fixtures_auth import b64url

    good = token_issuer.mint("RS256", scope="llm.tiny")
    h, _, s = good.split(".")
    forged = b64url(__import__("json").dumps(token_issuer.claims(scope="llm.all")).encode())
    await expect_401(verifier, f"{h}.{forged}.{s}", "signature is invalid")
    # Sanity: the untampered one passes.
    assert (await verifier.verify(good)).models == {"tiny"}


async def test_signature_by_key_with_wrong_type_for_alg(verifier: JwtVerifier, token_issuer: TokenIssuer) -> None:
    """An ES256 header pointing at the RSA key's kid: the key does not fit the alg, never used."""
    import json

    from tests.fixtures_auth import b64url

    t = token_issuer.mint("ES256")
    _, p, s = t.split(".")
    h = b64url(json.dumps({"alg": "ES256", "kid": token_issuer.kid("RS256")}).encode())
    await expect_401(verifier, f"{h}.{p}.{s}", "unknown key")


async def test_oversized_and_malformed(verifier: JwtVerifier, token_issuer: TokenIssuer) -> None:
    big = token_issuer.mint("RS256", padding="x" * 9000)
    await expect_401(verifier, big, "too large")
    await expect_401(verifier, "abc.def.ghi", "malformed")
    await expect_401(verifier, "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "not JSON")


async def test_unknown_kid_refreshes_once_then_rejects(token_issuer: TokenIssuer) -> None:
    clock = FakeClock()
    v = make_verifier(token_issuer, clock=clock, jwks_min_refresh_interval=30)
    try:
        await v.verify(token_issuer.mint("RS256"))
        fetched = token_issuer.hits["jwks"]
        stranger = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "not-published"})
        clock.t += 31
        await expect_401(v, token_issuer.mint("RS256", key=stranger), "unknown key")
        assert token_issuer.hits["jwks"] == fetched + 1  # refreshed once to look for the kid
        # More forged kids inside the refresh interval: rejected without touching the IdP.
        for i in range(5):
            k = JsonWebKey.generate_key("EC", "P-256", is_private=True, options={"kid": f"forged-{i}"})
            await expect_401(v, token_issuer.mint("ES256", key=k), "unknown key")
        assert token_issuer.hits["jwks"] == fetched + 1
    finally:
        await v.close()


async def test_rotation_picked_up_and_old_key_dropped(fresh_issuer: TokenIssuer) -> None:
    v = make_verifier(fresh_issuer)
    try:
        old = fresh_issuer.mint("EdDSA", sub="before")
        assert (await v.verify(old)).subject == "before"  # now in the verified-token cache too
        fresh_issuer.rotate(keep_old=False)
        await asyncio.sleep(0.25)  # past jwks_min_refresh_interval (0.2 s)
        new = fresh_issuer.mint("EdDSA", sub="after")
        assert (await v.verify(new)).subject == "after"
        # The old key is gone from the issuer's JWKS: the old token, though cached, no longer passes.
        await asyncio.sleep(0.25)
        await expect_401(v, old, "unknown key")
    finally:
        await v.close()


async def test_idp_down_with_cached_keys_still_verifies(fresh_issuer: TokenIssuer) -> None:
    clock = FakeClock()
    v = make_verifier(fresh_issuer, clock=clock, jwks_ttl=60, jwks_max_stale=600)
    try:
        await v.start()
        fresh_issuer.stop()
        clock.t += 120  # past the TTL: a background refresh fails, the stale keys keep working
        for alg in ALGS:
            assert (await v.verify(fresh_issuer.mint(alg, sub=alg))).subject == alg
        await asyncio.sleep(0.05)
        # An unknown kid while the IdP is down: cannot tell -> 503, not a guess.
        clock.t += 30
        stranger = JsonWebKey.generate_key("OKP", "Ed25519", is_private=True, options={"kid": "new-at-idp"})
        with pytest.raises(ApiError) as ei:
            await v.verify(fresh_issuer.mint("EdDSA", key=stranger))
        assert ei.value.status == 503
        # Past max_stale the keys are no longer trusted: fail closed.
        clock.t += 1000
        with pytest.raises(ApiError) as ei:
            await v.verify(fresh_issuer.mint("RS256", sub="fresh-token"))
        assert ei.value.status == 503 and ei.value.code == "auth_unavailable"
        # The IdP comes back: the next allowed refresh restores service.
        fresh_issuer.start()
        clock.t += 30
        assert (await v.verify(fresh_issuer.mint("RS256", sub="back"))).subject == "back"
    finally:
        await v.close()


async def test_idp_down_without_cached_keys_is_503(fresh_issuer: TokenIssuer) -> None:
    fresh_issuer.stop()
    v = make_verifier(fresh_issuer)
    try:
        await v.start()  # logs, does not raise
        with pytest.raises(ApiError) as ei:
            await v.verify(fresh_issuer.mint("RS256"))
        assert ei.value.status == 503
        assert ei.value.headers.get("retry-after")
    finally:
        await v.close()


async def test_ttl_refresh_happens_in_background(fresh_issuer: TokenIssuer) -> None:
    clock = FakeClock()
    v = make_verifier(fresh_issuer, clock=clock, jwks_ttl=60)
    try:
        await v.start()
        n = fresh_issuer.hits["jwks"]
        clock.t += 61
        await v.verify(fresh_issuer.mint("ES256", sub="a"))
        for _ in range(50):
            if fresh_issuer.hits["jwks"] > n:
                break
            await asyncio.sleep(0.02)
        assert fresh_issuer.hits["jwks"] == n + 1
    finally:
        await v.close()


async def test_jwks_url_without_discovery(token_issuer: TokenIssuer) -> None:
    before = token_issuer.hits["discovery"]
    v = make_verifier(token_issuer, jwks_url=token_issuer.url + "/realms/test/jwks.json")
    try:
        assert (await v.verify(token_issuer.mint("ES256"))).subject == "user-1"
    finally:
        await v.close()
    assert token_issuer.hits["discovery"] == before


async def test_claim_mapping_keycloak_and_entra_shapes(token_issuer: TokenIssuer) -> None:
    kc = make_verifier(
        token_issuer,
        scope_claims=["realm_access.roles", "resource_access.llm-gateway.roles"],
        tenant_claim="org.id",
        role_models={"tiny-users": ["tiny"], "small-users": ["small"]},
    )
    entra = make_verifier(token_issuer, subject_claim="oid", tenant_claim="tid", scope_claims=["roles"])
    try:
        p = await kc.verify(
            token_issuer.mint(
                "RS256",
                scope="llm.all",  # not a configured claim here: ignored
                realm_access={"roles": ["tiny-users", "offline_access"]},
                resource_access={"llm-gateway": {"roles": ["small-users"]}},
                org={"id": "acme"},
            )
        )
        assert p.models == {"tiny", "small"} and p.tenant == "acme"
        p = await entra.verify(token_issuer.mint("RS256", oid="obj-42", tid="tenant-guid", roles=["gpu-users"]))
        assert (p.subject, p.tenant, p.models) == ("obj-42", "tenant-guid", {"big"})
        p = await entra.verify(token_issuer.mint("RS256", oid="obj-43", roles=[]))
        assert p.models == frozenset() and p.tenant == "default"
    finally:
        await kc.close()
        await entra.close()


def test_claim_at_prefers_exact_names_with_dots() -> None:
    claims = {"https://example.com/roles": ["a"], "realm_access": {"roles": ["b"]}}
    assert claim_at(claims, "https://example.com/roles") == ["a"]
    assert claim_at(claims, "realm_access.roles") == ["b"]
    assert claim_at(claims, "realm_access.missing.x") is None


@pytest.mark.parametrize("algs", [["HS256"], ["none"], ["RS256", "HS512"], []])
def test_settings_refuse_unsafe_algorithms(algs) -> None:
    with pytest.raises(ValueError):
        GatewaySettings(auth={"issuers": [{"issuer": "https://idp", "audience": AUDIENCE, "algorithms": algs}]})


def test_settings_require_audience() -> None:
    with pytest.raises(ValueError):
        GatewaySettings(auth={"issuers": [{"issuer": "https://idp", "audience": []}]})
    s = GatewaySettings(auth={"issuers": [{"issuer": "https://idp", "audience": "api://llm"}]})
    assert s.auth.issuers[0].audience == ["api://llm"]


async def test_unknown_critical_header_rejected(verifier: JwtVerifier, token_issuer: TokenIssuer) -> None:
    """A validly signed token with a "crit" extension the gateway does not implement must not pass
    (RFC 7515 §4.1.11). Authlib refuses to mint one, so it is signed here by hand (RS256)."""
    import json

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from tests.fixtures_auth import b64url

    header = {"alg": "RS256", "kid": token_issuer.kid("RS256"), "crit": ["x-must-understand"], "x-must-understand": True}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(token_issuer.claims()).encode())}"
    private = token_issuer.keys["RS256"].get_private_key()
    sig = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    await expect_401(verifier, f"{signing_input}.{b64url(sig)}", "does not support")
    # The same construction without "crit" passes: the rejection above is about the header alone.
    header.pop("crit")
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(token_issuer.claims()).encode())}"
    sig = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    assert (await verifier.verify(f"{signing_input}.{b64url(sig)}")).subject == "user-1"
    # Unknown non-critical header fields (x5t, nonce, ...) are fine.
    assert (await verifier.verify(token_issuer.mint("ES256", header={"x-vendor": "1"}))).subject == "user-1"


async def test_malformed_tokens_are_401_never_500(verifier: JwtVerifier, token_issuer: TokenIssuer) -> None:
    import json

    from tests.fixtures_auth import b64url

    def enc(obj) -> str:
        return b64url(json.dumps(obj).encode())

    good = token_issuer.mint("RS256")
    h, p, s = good.split(".")
    claims = token_issuer.claims()
    cases = [
        f"{enc(['alg'])}.{p}.{s}",  # header is a list
        f"{enc({'alg': ['RS256']})}.{p}.{s}",  # alg not a string
        f"{enc({'alg': 'RS256', 'kid': 7})}.{p}.{s}",  # kid not a string
        f"{enc({'alg': 'RS256', 'b64': False, 'crit': ['b64']})}.{p}.{s}",  # unencoded payload
        f"{h}.{enc([claims])}.{s}",  # payload a list
        f"{h}.{enc(dict(claims, iss=['x']))}.{s}",  # iss not a string
        f"{h}.{p}.",  # no signature
        f"{h}.{p}.!!!",  # signature not base64url
        f"{h}..{s}",  # empty payload
        "é.é.é",  # not ASCII
        "..",
    ]
    for token in cases:
        with pytest.raises(ApiError) as ei:
            await verifier.verify(token)
        assert ei.value.status == 401, (token, ei.value.message)
    # Claims with odd types after a valid signature: exp as a string, roles as a number.
    for bad in ({"exp": "tomorrow"}, {"iat": True}, {"aud": 5}):
        with pytest.raises(ApiError) as ei:
            await verifier.verify(token_issuer.mint("ES256", **bad))
        assert ei.value.status == 401
    p = await verifier.verify(token_issuer.mint("ES256", scope=42, roles={"a": 1}, groups=["llm.tiny", 3], tenant=["x"]))
    assert p.models == {"tiny"} and p.tenant == "default"


async def test_refresh_is_single_flight(fresh_issuer: TokenIssuer) -> None:
    """Past the TTL, the background refresh and requests waiting for a new kid share one fetch."""
    clock = FakeClock()
    v = make_verifier(fresh_issuer, clock=clock, jwks_ttl=60, jwks_min_refresh_interval=10)
    try:
        cached = fresh_issuer.mint("RS256", sub="cached")
        assert (await v.verify(cached)).subject == "cached"
        n = fresh_issuer.hits["jwks"]
        fresh_issuer.rotate(keep_old=True)
        clock.t += 61
        new_tokens = [fresh_issuer.mint(alg, sub=f"new-{alg}") for alg in ALGS for _ in range(3)]
        # Cached hits first (each past the TTL: background refresh), then tokens with kids not seen yet.
        got = await asyncio.gather(*(v.verify(cached) for _ in range(5)), *(v.verify(t) for t in new_tokens))
        assert [p.subject for p in got[5:]] == [f"new-{alg}" for alg in ALGS for _ in range(3)]
        assert fresh_issuer.hits["jwks"] == n + 1
        # A second TTL period: again exactly one fetch, however many requests arrive.
        clock.t += 61
        await asyncio.gather(*(v.verify(cached) for _ in range(10)))
        for _ in range(50):
            if fresh_issuer.hits["jwks"] > n + 1:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert fresh_issuer.hits["jwks"] == n + 2
    finally:
        await v.close()


async def test_removed_kid_stops_cached_tokens_without_other_traffic(fresh_issuer: TokenIssuer) -> None:
    """Only the cached token is used: the TTL refresh it triggers itself drops the removed key's verifications,
    while a key that was merely added drops nothing."""
    clock = FakeClock()
    v = make_verifier(fresh_issuer, clock=clock, jwks_ttl=60, jwks_min_refresh_interval=10)
    try:
        token = fresh_issuer.mint("ES256", sub="cached")
        assert (await v.verify(token)).subject == "cached"
        gen = cache_of(v).generation
        fresh_issuer.rotate(keep_old=True)  # a key added, the old one kept
        clock.t += 61
        assert (await v.verify(token)).subject == "cached"
        await asyncio.sleep(0.2)
        assert cache_of(v).generation == gen  # nothing removed: cached verifications stay
        fresh_issuer.retired.clear()  # the IdP removes the old key
        clock.t += 61
        assert (await v.verify(token)).subject == "cached"  # this hit starts the refresh (stale keys meanwhile)
        for _ in range(50):
            if cache_of(v).generation != gen:
                break
            await asyncio.sleep(0.02)
        await expect_401(v, token, "unknown key")
    finally:
        await v.close()


def test_plain_http_jwks_outside_loopback_warns(caplog) -> None:
    from gateway.auth.jwks import JwksCache, url_is_safe
    from gateway.settings import IssuerConfig

    assert url_is_safe("https://idp.example/jwks") and url_is_safe("http://127.0.0.1:8080/jwks")
    assert url_is_safe("http://[::1]/jwks") and url_is_safe("http://localhost/jwks")
    assert not url_is_safe("http://idp.example/jwks") and not url_is_safe("http://10.0.0.5/jwks")
    with caplog.at_level("WARNING", logger="gateway.auth.jwks"):
        JwksCache(IssuerConfig(issuer="http://idp.example/realms/x", audience="a"))
    assert any("plain http" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gateway.auth.jwks"):
        JwksCache(IssuerConfig(issuer="https://idp.example/realms/x", audience="a"))
        JwksCache(IssuerConfig(issuer="http://127.0.0.1:9/realms/x", audience="a"))
    assert not caplog.records
