"""Turns a request's credentials into a :class:`Principal`, or raises a 401 :class:`ApiError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import ANONYMOUS, Principal
from gateway.errors import ApiError

if TYPE_CHECKING:
    from gateway.auth.tokens import JwtVerifier

# Bearer credentials longer than this are rejected before any parsing.
MAX_CREDENTIAL_BYTES = 8192


def unauthorized(message: str, error: str = "invalid_token") -> ApiError:
    return ApiError(
        401,
        message,
        type="invalid_request_error",
        code="invalid_api_key",
        headers={"www-authenticate": f'Bearer error="{error}"'},
        reason="unauthenticated",
    )


def bearer_token(
    headers: dict[bytes, bytes] | list[tuple[bytes, bytes]], limit: int = MAX_CREDENTIAL_BYTES
) -> str | None:
    """The credential from ``Authorization: Bearer`` (or ``api-key`` / ``x-api-key`` headers).

    More than one credential header (two ``Authorization``, or ``Authorization`` and ``x-api-key``) is a 400:
    which one "wins" would otherwise depend on the order a proxy wrote them in."""
    items = headers.items() if isinstance(headers, dict) else headers
    auth = None
    alt = None
    seen = 0
    for k, v in items:
        if k == b"authorization":
            auth = v
            seen += 1
        elif k in (b"api-key", b"x-api-key"):
            alt = v
            seen += 1
    if seen > 1:
        raise ApiError(
            400,
            "More than one credential was sent (Authorization, api-key, x-api-key): send exactly one.",
            code="duplicate_credentials",
            reason="invalid_request",
        )
    if auth is not None:
        if len(auth) > limit + 16:
            raise unauthorized("The credential is too large.")
        scheme, _, cred = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not cred.strip():
            raise unauthorized("Authorization header must be 'Bearer <api key or token>'.")
        return cred.strip().decode("latin-1")
    if alt is not None:
        if len(alt) > limit:
            raise unauthorized("The credential is too large.")
        return alt.strip().decode("latin-1")
    return None


class Authenticator:
    """API keys, then (for credentials shaped like a JWT) ``token_verifier.verify(token)`` (gateway/auth/tokens.py).

    Authorization is 403 for an existing model the principal may not use (404 is kept for models that do
    not exist at all): model names are not secrets here, and a clear 403 saves callers a support ticket.
    """

    def __init__(
        self,
        keys: ApiKeyStore,
        *,
        enabled: bool = True,
        token_verifier: JwtVerifier | None = None,
        max_credential_bytes: int = MAX_CREDENTIAL_BYTES,
    ) -> None:
        self.keys = keys
        self.enabled = enabled
        self.token_verifier = token_verifier
        self.max_credential_bytes = max_credential_bytes

    async def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        cred = bearer_token(headers, self.max_credential_bytes)
        if cred is None:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", error="invalid_request"
            )
        hit = self.keys.entry(cred)
        if hit is not None:
            if hit[0].disabled:
                raise unauthorized("This API key has been revoked.")
            return hit[1]
        if self.token_verifier is not None and cred.count(".") == 2:
            return await self.token_verifier.verify(cred)
        raise unauthorized("Incorrect API key provided.")

    def authorize(self, principal: Principal, model: str) -> None:
        if not principal.may_use(model):
            raise ApiError(
                403,
                f"You do not have access to the model '{model}'.",
                type="permission_error",
                param="model",
                code="model_not_allowed",
                reason="forbidden",
            )
