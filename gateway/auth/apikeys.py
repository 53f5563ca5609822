"""API keys: stored as sha256 digests, looked up by digest, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import yaml

from gateway.auth.principal import Principal
from gateway.settings import ApiKeyConfig

KEY_PREFIX = "sk-llm-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeyStore:
    """Maps key digests to principals. The raw key is never stored."""

    def __init__(self, keys: list[ApiKeyConfig]) -> None:
        self._by_digest: dict[str, tuple[ApiKeyConfig, Principal]] = {}
        for k in keys:
            p = Principal(
                subject=k.subject or k.id,
                tenant=k.tenant,
                kind="api_key",
                key_id=k.id,
                models=frozenset(k.models),
            )
            self._by_digest[k.sha256] = (k, p)

    @classmethod
    def from_settings(cls, keys: list[ApiKeyConfig], keys_file: str | None) -> ApiKeyStore:
        all_keys = list(keys)
        if keys_file:
            data = yaml.safe_load(Path(keys_file).read_text()) or []
            if isinstance(data, dict):
                data = data.get("api_keys", [])
            all_keys.extend(ApiKeyConfig.model_validate(d) for d in data)
        return cls(all_keys)

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, key: str) -> Principal | None:
        """The principal for ``key``, or None. Disabled (revoked) keys return None."""
        d = digest(key)
        hit = self._by_digest.get(d)
        # The dict lookup is by digest (not secret-dependent timing on the key itself); the final
        # compare is constant-time anyway, as defence in depth.
        if hit is None or not hmac.compare_digest(hit[0].sha256, d):
            return None
        if hit[0].disabled:
            return None
        return hit[1]
