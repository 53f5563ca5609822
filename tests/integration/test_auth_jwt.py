"""The gateway as an OAuth2 resource server: real gateway processes, a real token issuer over HTTP.

Most cases are decided before any upstream is contacted (401/403/503 and /v1/models), so those gateways point
their models at a closed port; the OpenAI SDK test at the end goes through the real vLLM engine.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import KEY_ALL, KEY_LIMITED, KEY_REVOKED, MODEL, default_keys
from tests.fixtures_auth import JsonWebKey, TokenIssuer, b64url
from tests.support import free_port, sha256_hex

ROLE_MODELS = {"llm.all": ["*"], "llm.tiny": ["tiny"], "llm.small": ["small"]}
MINTED: list[str] = []  # every token sent to the shared gateway; none may show up in its log


def config(issuer: TokenIssuer | None, upstream: str | None = None, **extra: Any) -> dict[str, Any]:
    up = upstream or f"http://127.0.0.1:{free_port()}"  # nothing listens: these tests never get that far
    cfg: dict[str, Any] = {
        "models": [{"name": "tiny", "upstreams": [up]}, {"name": "small", "upstreams": [up]}],
        "api_keys": default_keys(),
        "health_interval": 5,
        "log_level": "debug",
        "auth": {"issuers": [issuer.issuer_config()] if issuer else [], "role_models": ROLE_MODELS},
    }
    cfg.update(extra)
    return cfg


def bearer(token: str) -> dict[str, str]:
    MINTED.append(token)
    return {"authorization": f"Bearer {token}"}


def chat(gw, token: str, model: str = "tiny") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=bearer(token), timeout=30)


def models(gw, token: str) -> httpx.Response:
    return httpx.get(gw.url + "/v1/models", headers=bearer(token), timeout=30)


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def assert_401(r: httpx.Response, fragment: str) -> None:
    err = assert_openai_error(r, 401)
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert fragment in err["message"], err["message"]


@pytest.fixture(scope="module")
def jwt_gateway(token_issuer: TokenIssuer, gateway_factory):
    return gateway_factory(config(token_issuer))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_valid_tokens_each_algorithm(jwt_gateway, token_issuer: TokenIssuer, alg: str) -> None:
    r = models(jwt_gateway, token_issuer.mint(alg, scope="llm.all"))
    assert r.status_code == 200, r.text
    assert sorted(m["id"] for m in r.json()["data"]) == ["small", "tiny"]


@pytest.mark.parametrize(
    "cred, expected",
    [
        ({"scope": "llm.all"}, ["small", "tiny"]),
        ({"scope": "llm.tiny"}, ["tiny"]),
        ({"scope": "llm.small openid"}, ["small"]),
        ({"scope": "openid profile"}, []),
        (KEY_ALL, ["small", "tiny"]),
        (KEY_LIMITED, []),  # may use only "other-model", which this gateway does not serve
    ],
    ids=["token-all", "token-tiny", "token-small", "token-no-models", "key-all", "key-limited"],
)
def test_models_list_filtered_per_caller(jwt_gateway, token_issuer: TokenIssuer, cred, expected) -> None:
    token = token_issuer.mint("ES256", **cred) if isinstance(cred, dict) else cred
    r = models(jwt_gateway, token)
    assert r.status_code == 200, r.text
    assert sorted(m["id"] for m in r.json()["data"]) == expected


def test_model_outside_scopes_is_403(jwt_gateway, token_issuer: TokenIssuer) -> None:
    token = token_issuer.mint("EdDSA", scope="llm.small")
    err = assert_openai_error(chat(jwt_gateway, token, "tiny"), 403)
    assert (err["type"], err["code"], err["param"]) == ("permission_error", "model_not_allowed", "model")
    err = assert_openai_error(httpx.get(jwt_gateway.url + "/v1/models/tiny", headers=bearer(token)), 403)
    assert err["code"] == "model_not_allowed"
    r = httpx.get(jwt_gateway.url + "/v1/models/small", headers=bearer(token))
    assert r.status_code == 200 and r.json()["id"] == "small"
    # A model that does not exist is 404 for everyone (403 only ever means "exists, not yours").
    assert assert_openai_error(chat(jwt_gateway, token, "no-such-model"), 404)["code"] == "model_not_found"


def test_rejected_tokens_are_401(jwt_gateway, token_issuer: TokenIssuer) -> None:
    now = int(time.time())
    t = token_issuer
    good = t.mint("RS256", scope="llm.tiny")
    h, _, s = good.split(".")
    tampered = f"{h}.{b64url(json.dumps(t.claims(scope='llm.all')).encode())}.{s}"
    cases = {
        "expired": (t.mint("RS256", exp=now - 3600, iat=now - 7200, nbf=now - 7200), "expired"),
        "not yet valid": (t.mint("ES256", nbf=now + 3600), "not valid yet"),
        "wrong issuer": (t.mint("EdDSA", iss="https://idp.evil.example/realms/test"), "issuer is not trusted"),
        "wrong audience": (t.mint("RS256", aud="another-api"), "not meant for this service"),
        "alg none": (t.mint_unsigned(), "'none' is not accepted"),
        "HS256 with public key": (t.mint_hs256_with_public_key(), "'HS256' is not accepted"),
        "tampered payload": (tampered, "signature is invalid"),
        "oversized": (t.mint("RS256", blob="x" * 10000), "too large"),
        "garbage": ("aaa.bbb.ccc", "malformed"),
    }
    for name, (token, fragment) in cases.items():
        r = chat(jwt_gateway, token)
        assert r.status_code == 401, f"{name}: {r.status_code} {r.text}"
        assert_401(r, fragment)
    assert chat(jwt_gateway, good, "small").status_code == 403  # the untampered token is valid


def test_unknown_kid_refreshes_then_rejects(jwt_gateway, token_issuer: TokenIssuer) -> None:
    time.sleep(0.3)  # past the gateway's jwks_min_refresh_interval
    before = token_issuer.hits["jwks"]
    stranger = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "never-published"})
    assert_401(chat(jwt_gateway, token_issuer.mint("RS256", key=stranger)), "unknown key")
    assert token_issuer.hits["jwks"] == before + 1


def test_revoked_api_key(jwt_gateway) -> None:
    assert_401(chat(jwt_gateway, KEY_REVOKED), "revoked")
    assert_401(chat(jwt_gateway, "sk-never-issued"), "Incorrect API key")
    r = httpx.post(jwt_gateway.url + "/v1/chat/completions", json={"model": "tiny"})
    assert_openai_error(r, 401)
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_request"'


def test_key_rotation_without_restart(fresh_issuer: TokenIssuer, gateway_factory) -> None:
    gw = gateway_factory(config(fresh_issuer))
    try:
        pid = gw.proc.pid
        assert models(gw, fresh_issuer.mint("ES256")).status_code == 200
        fresh_issuer.rotate(keep_old=False)
        time.sleep(0.3)
        for alg in ("RS256", "ES256", "EdDSA"):
            r = models(gw, fresh_issuer.mint(alg, scope="llm.tiny"))
            assert r.status_code == 200, r.text
            assert [m["id"] for m in r.json()["data"]] == ["tiny"]
        assert gw.proc.proc.poll() is None and gw.proc.pid == pid
    finally:
        gw.stop()


def test_idp_down_with_and_without_cached_keys(fresh_issuer: TokenIssuer, gateway_factory) -> None:
    warm = gateway_factory(config(fresh_issuer))  # fetched the keys at start
    fresh_issuer.stop()
    cold = gateway_factory(config(fresh_issuer))  # started while the IdP is down: nothing cached
    try:
        token = fresh_issuer.mint("RS256", scope="llm.all")
        for _ in range(3):
            r = models(warm, token)
            assert r.status_code == 200, r.text
        r = models(cold, token)
        err = assert_openai_error(r, 503)
        assert err["code"] == "auth_unavailable" and r.headers.get("retry-after")
        r = chat(cold, token)
        assert r.status_code == 503
        # The IdP comes back: the cold gateway recovers without a restart.
        fresh_issuer.start()
        time.sleep(0.3)
        assert models(cold, token).status_code == 200
    finally:
        warm.stop()
        cold.stop()


def test_api_key_file_reload_and_sighup(tmp_path, gateway_factory) -> None:
    keyfile = tmp_path / "keys.yaml"
    keyfile.write_text(yaml.safe_dump([{"id": "f1", "sha256": sha256_hex("sk-file-1"), "models": ["tiny"]}]))
    gw = gateway_factory(config(None, api_keys_file=str(keyfile), auth={"keys_file_poll_interval": 0.2}))
    hup = gateway_factory(config(None, api_keys_file=str(keyfile), auth={"keys_file_poll_interval": 0}))
    try:
        for g in (gw, hup):
            assert [m["id"] for m in models(g, "sk-file-1").json()["data"]] == ["tiny"]
        keyfile.write_text(
            yaml.safe_dump(
                [
                    {"id": "f1", "sha256": sha256_hex("sk-file-1"), "models": ["tiny"], "disabled": True},
                    {"id": "f2", "sha256": sha256_hex("sk-file-2"), "models": ["small"]},
                ]
            )
        )
        deadline = time.monotonic() + 20
        while models(gw, "sk-file-1").status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert_401(models(gw, "sk-file-1"), "revoked")
        assert [m["id"] for m in models(gw, "sk-file-2").json()["data"]] == ["small"]
        # Polling is off on the second gateway: it still accepts the old key until SIGHUP.
        assert models(hup, "sk-file-1").status_code == 200
        hup.proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while models(hup, "sk-file-1").status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert_401(models(hup, "sk-file-1"), "revoked")
        assert hup.proc.proc.poll() is None
    finally:
        gw.stop()
        hup.stop()


def test_tokens_never_logged(jwt_gateway) -> None:
    """Runs after the cases above (same module): the debug-level log holds none of the tokens sent."""
    assert MINTED, "no tokens were sent"
    chat(jwt_gateway, MINTED[0])
    log = jwt_gateway.proc.log()
    assert "signing keys loaded" in log  # the log is there, and at debug level
    for token in MINTED:
        assert token not in log
        parts = token.split(".")
        if len(parts) == 3 and len(parts[2]) > 16:
            assert parts[2] not in log  # not even the signature part


@pytest.mark.engine
def test_openai_sdk_with_client_credentials_token(engine, token_issuer: TokenIssuer, gateway_factory) -> None:
    """A batch job gets a token with the client-credentials grant (Authlib's OAuth2 client) and hands it to
    the OpenAI SDK as its api_key (a callable that refreshes it, as docs/auth.md shows); the gateway verifies
    it and proxies to the real vLLM engine."""
    import openai
    from authlib.integrations.httpx_client import OAuth2Client

    gw = gateway_factory(config(token_issuer, upstream=engine.url))
    before = token_issuer.hits["token"]
    issued: list[str] = []
    with OAuth2Client("batch-job", "s3cret-batch", scope="llm.tiny") as oauth:
        token = None

        def access_token() -> str:
            nonlocal token
            if token is None or token.is_expired(leeway=60):
                token = oauth.fetch_token(token_issuer.issuer + "/token", grant_type="client_credentials")
                issued.append(token["access_token"])
                MINTED.append(token["access_token"])
            return token["access_token"]

        with openai.OpenAI(base_url=gw.base_url, api_key=access_token, max_retries=0, timeout=120) as client:
            assert [m.id for m in client.models.list()] == ["tiny"]
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert r.usage.completion_tokens == 4 and r.choices[0].message.role == "assistant"
            chunks = list(
                client.completions.create(model=MODEL, prompt="a b c", max_tokens=3, stream=True, extra_body={"ignore_eos": True})
            )
            assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 1
            with pytest.raises(openai.PermissionDeniedError):
                client.chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    # One token from the IdP served all four requests.
    assert token_issuer.hits["token"] - before == 1 and len(issued) == 1
    expired = token_issuer.mint("EdDSA", scope="llm.tiny", exp=int(time.time()) - 600)
    MINTED.append(expired)
    with openai.OpenAI(base_url=gw.base_url, api_key=expired, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    log = gw.proc.log()
    assert issued[0] not in log and expired not in log
