"""A real OAuth2/OIDC token issuer over HTTP on 127.0.0.1, for the auth tests.

It serves OIDC discovery, a JWKS and a client-credentials token endpoint, mints tokens with Authlib
(``authlib.jose``; the gateway verifies with joserfc, so every test is also a cross-implementation check),
can rotate its keys and can be taken down and brought back on the same port.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import authlib.deprecate  # noqa: E402,F401  (installs its own "always" filter; ours must come after it)
import pytest

from tests.support import free_port

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # authlib.jose is deprecated in favour of joserfc; fine for minting
    from authlib.jose import JsonWebKey, JsonWebToken

ALGS = ("RS256", "ES256", "EdDSA")
AUDIENCE = "llm-gateway"
_KEY_SPECS = {"RS256": ("RSA", 2048), "ES256": ("EC", "P-256"), "EdDSA": ("OKP", "Ed25519")}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _generate(alg: str, generation: int) -> Any:
    kty, size = _KEY_SPECS[alg]
    return JsonWebKey.generate_key(kty, size, is_private=True, options={"kid": f"{alg.lower()}-{generation}-{uuid.uuid4().hex[:6]}"})


class TokenIssuer:
    """An identity provider: /.well-known/openid-configuration, /jwks.json, /token (client_credentials)."""

    def __init__(self, clients: dict[str, tuple[str, list[str]]] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = self.url + "/realms/test"
        self.generation = 0
        self.keys: dict[str, Any] = {alg: _generate(alg, 0) for alg in ALGS}
        self.retired: list[Any] = []  # old keys still published after a rotation (if asked to keep them)
        # client_id -> (secret, scopes it may request)
        self.clients = clients or {}
        self.hits: dict[str, int] = {"discovery": 0, "jwks": 0, "token": 0}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- keys and tokens ---------------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            keys = list(self.keys.values()) + self.retired
        return {"keys": [dict(k.as_dict(is_private=False), use="sig") for k in keys]}

    def rotate(self, keep_old: bool = False) -> None:
        with self._lock:
            self.generation += 1
            if keep_old:
                self.retired.extend(self.keys.values())
            self.keys = {alg: _generate(alg, self.generation) for alg in ALGS}

    def kid(self, alg: str) -> str:
        return self.keys[alg].as_dict()["kid"]

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        c: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-1",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "scope": "llm.all",
            "tenant": "team-jwt",
        }
        c.update(overrides)
        return {k: v for k, v in c.items() if v is not None}

    def mint(self, alg: str = "RS256", key: Any = None, header: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token signed with Authlib; ``key`` overrides the issuer's current key for ``alg``."""
        k = key if key is not None else self.keys[alg]
        h = {"alg": alg, "kid": k.as_dict()["kid"], "typ": "JWT"}
        h.update(header or {})
        h = {k2: v for k2, v in h.items() if v is not None}
        return JsonWebToken([alg]).encode(h, self.claims(**claims), k).decode()

    def mint_unsigned(self, **claims: Any) -> str:
        """``alg: none`` (crafted by hand: no library should help with this)."""
        header = {"alg": "none", "typ": "JWT"}
        return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(self.claims(**claims)).encode())}."

    def mint_hs256_with_public_key(self, **claims: Any) -> str:
        """Algorithm confusion: HS256 with the issuer's RSA public key (PEM) as the HMAC secret."""
        secret = self.keys["RS256"].as_pem(is_private=False)
        header = {"alg": "HS256", "typ": "JWT", "kid": self.kid("RS256")}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(self.claims(**claims)).encode())}"
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + b64url(sig)

    # -- HTTP server -------------------------------------------------------------------------------------

    def start(self) -> TokenIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, obj: Any) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/realms/test/.well-known/openid-configuration":
                    issuer.hits["discovery"] += 1
                    self._json(
                        200,
                        {
                            "issuer": issuer.issuer,
                            "jwks_uri": issuer.url + "/realms/test/jwks.json",
                            "token_endpoint": issuer.url + "/realms/test/token",
                            "grant_types_supported": ["client_credentials"],
                            "id_token_signing_alg_values_supported": list(ALGS),
                        },
                    )
                elif self.path == "/realms/test/jwks.json":
                    issuer.hits["jwks"] += 1
                    self._json(200, issuer.jwks())
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                if self.path != "/realms/test/token":
                    self._json(404, {"error": "not_found"})
                    return
                issuer.hits["token"] += 1
                n = int(self.headers.get("content-length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(n).decode()).items()}
                cid, secret = form.get("client_id"), form.get("client_secret")
                basic = self.headers.get("authorization", "")
                if basic.lower().startswith("basic "):
                    cid, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
                if form.get("grant_type") != "client_credentials":
                    self._json(400, {"error": "unsupported_grant_type"})
                    return
                client = issuer.clients.get(cid or "")
                if client is None or not hmac.compare_digest(client[0], secret or ""):
                    self._json(401, {"error": "invalid_client"})
                    return
                wanted = form.get("scope", "").split() or client[1]
                granted = [s for s in wanted if s in client[1]]
                token = issuer.mint("RS256", sub=f"service-account-{cid}", scope=" ".join(granted), azp=cid)
                self._json(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300, "scope": " ".join(granted)})

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take the provider down: its port refuses connections until start() again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    @property
    def up(self) -> bool:
        return self._server is not None

    def issuer_config(self, **overrides: Any) -> dict[str, Any]:
        """The gateway's ``auth.issuers`` entry for this provider (discovery, fast refresh for tests)."""
        cfg: dict[str, Any] = {
            "issuer": self.issuer,
            "audience": AUDIENCE,
            "tenant_claim": "tenant",
            "jwks_min_refresh_interval": 0.2,
            "http_timeout": 2.0,
        }
        cfg.update(overrides)
        return cfg


@pytest.fixture(scope="module")
def token_issuer() -> Iterator[TokenIssuer]:
    """A running token issuer for one test module (tests that rotate or stop it use their own)."""
    t = TokenIssuer(clients={"batch-job": ("s3cret-batch", ["llm.tiny", "llm.small"])}).start()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture
def fresh_issuer() -> Iterator[TokenIssuer]:
    """A token issuer of the test's own, free to rotate or take down."""
    t = TokenIssuer().start()
    try:
        yield t
    finally:
        t.stop()
