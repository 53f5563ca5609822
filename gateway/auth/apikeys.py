"""API keys: stored as sha256 digests, looked up by digest, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

import yaml

from gateway.auth.principal import Principal
from gateway.settings import ApiKeyConfig

log = logging.getLogger("gateway.auth.apikeys")

KEY_PREFIX = "sk-llm-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def read_key_file(path: str) -> list[ApiKeyConfig]:
    """The keys in a YAML file: a list of entries, or a mapping with an ``api_keys`` list."""
    data = yaml.safe_load(Path(path).read_text()) or []
    if isinstance(data, dict):
        data = data.get("api_keys", [])
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of API key entries")
    return [ApiKeyConfig.model_validate(d) for d in data]


class ApiKeyStore:
    """Maps key digests to principals. The raw key is never stored.

    Keys come from the config and optionally from a key file; :meth:`reload` re-reads the file (on SIGHUP,
    or when :meth:`reload_if_changed` sees a new mtime) and swaps the table in one step. A key whose entry
    says ``disabled: true`` is revoked: it authenticates nobody, and says so.
    """

    def __init__(self, keys: list[ApiKeyConfig], keys_file: str | None = None) -> None:
        self._config_keys = list(keys)
        self.keys_file = keys_file
        self._file_mtime: float | None = None
        self._by_digest: dict[str, tuple[ApiKeyConfig, Principal]] = self._table(keys)

    @staticmethod
    def _table(keys: list[ApiKeyConfig]) -> dict[str, tuple[ApiKeyConfig, Principal]]:
        table: dict[str, tuple[ApiKeyConfig, Principal]] = {}
        for k in keys:
            p = Principal(
                subject=k.subject or k.id,
                tenant=k.tenant,
                kind="api_key",
                key_id=k.id,
                models=frozenset(k.models),
            )
            prev = table.get(k.sha256)
            # The same digest twice: a revocation anywhere wins.
            if prev is None or not prev[0].disabled:
                table[k.sha256] = (k, p)
        return table

    @classmethod
    def from_settings(cls, keys: list[ApiKeyConfig], keys_file: str | None) -> ApiKeyStore:
        store = cls(keys, keys_file)
        if keys_file:
            store.reload()  # a bad file at start is a configuration error: let it raise
        return store

    def reload(self) -> int:
        """Re-read the key file; the table is replaced only if the whole file is valid. Returns the key count."""
        if not self.keys_file:
            return len(self)
        mtime = os.stat(self.keys_file).st_mtime_ns
        file_keys = read_key_file(self.keys_file)
        self._by_digest = self._table(self._config_keys + file_keys)
        self._file_mtime = mtime
        return len(self)

    def reload_if_changed(self, force: bool = False) -> bool:
        """Reload when the key file's mtime changed (or ``force``, e.g. on SIGHUP). Errors are logged and the
        old keys kept."""
        if not self.keys_file:
            return False
        try:
            mtime = os.stat(self.keys_file).st_mtime_ns
            if mtime == self._file_mtime and not force:
                return False
            n = self.reload()
        except Exception as e:  # missing or invalid file: keep serving the keys we have
            log.error("cannot reload the API key file; keeping the previous keys", extra={"path": self.keys_file, "error": str(e)[:300]})
            return False
        log.info("API key file reloaded", extra={"path": self.keys_file, "api_keys": n})
        return True

    def __len__(self) -> int:
        return len(self._by_digest)

    def entry(self, key: str) -> tuple[ApiKeyConfig, Principal] | None:
        """The stored entry for ``key`` (revoked ones included), or None."""
        d = digest(key)
        hit = self._by_digest.get(d)
        # The dict lookup is by digest (not secret-dependent timing on the key itself); the final
        # compare is constant-time anyway, as defence in depth.
        if hit is None or not hmac.compare_digest(hit[0].sha256, d):
            return None
        return hit

    def lookup(self, key: str) -> Principal | None:
        """The principal for ``key``, or None. Disabled (revoked) keys return None."""
        hit = self.entry(key)
        if hit is None or hit[0].disabled:
            return None
        return hit[1]
