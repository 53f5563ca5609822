"""API keys: digest store, revocation, key-file reload; the Authenticator's 401/403 shapes; the keys CLI."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from gateway.auth import Authenticator
from gateway.auth.apikeys import ApiKeyStore, digest
from gateway.errors import ApiError
from gateway.settings import ApiKeyConfig
from tests.support import PY, REPO


def entry(id: str, key: str, **kw) -> dict:
    return {"id": id, "sha256": digest(key), **kw}


def hdr(cred: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {cred}".encode())]


async def test_revoked_key_says_so_and_unknown_key_is_401() -> None:
    store = ApiKeyStore([ApiKeyConfig(**entry("a", "sk-a", models=["tiny"])), ApiKeyConfig(**entry("r", "sk-r", disabled=True))])
    auth = Authenticator(store)
    p = await auth.authenticate(hdr("sk-a"))
    assert (p.subject, p.key_id, p.models) == ("a", "a", {"tiny"})
    for cred, msg in (("sk-r", "revoked"), ("sk-nope", "Incorrect API key")):
        with pytest.raises(ApiError) as ei:
            await auth.authenticate(hdr(cred))
        assert ei.value.status == 401 and msg in ei.value.message
        assert ei.value.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        body = json.loads(ei.value.body())
        assert set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(ApiError) as ei:
        auth.authorize(p, "small")
    assert ei.value.status == 403 and ei.value.code == "model_not_allowed"


async def test_missing_and_oversized_credentials() -> None:
    auth = Authenticator(ApiKeyStore([]), max_credential_bytes=1024)
    with pytest.raises(ApiError) as ei:
        await auth.authenticate([])
    assert ei.value.status == 401 and ei.value.headers["www-authenticate"] == 'Bearer error="invalid_request"'
    with pytest.raises(ApiError) as ei:
        await auth.authenticate(hdr("x" * 5000))
    assert ei.value.status == 401 and "too large" in ei.value.message


def test_key_file_reload_revokes_and_adds(tmp_path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(yaml.safe_dump([entry("file-a", "sk-file-a")]))
    store = ApiKeyStore.from_settings([ApiKeyConfig(**entry("cfg", "sk-cfg"))], str(f))
    assert store.lookup("sk-file-a").key_id == "file-a" and store.lookup("sk-cfg").key_id == "cfg"
    assert store.reload_if_changed() is False  # unchanged
    f.write_text(yaml.safe_dump({"api_keys": [entry("file-a", "sk-file-a", disabled=True), entry("file-b", "sk-file-b")]}))
    os.utime(f, ns=(1, 1))  # a distinct mtime even on coarse filesystems
    assert store.reload_if_changed() is True
    assert store.lookup("sk-file-a") is None and store.entry("sk-file-a")[0].disabled
    assert store.lookup("sk-file-b").key_id == "file-b"
    assert store.lookup("sk-cfg").key_id == "cfg"  # config keys survive reloads
    # A broken file keeps the last good table.
    f.write_text("- {id: broken, sha256: not-a-digest}\n")
    os.utime(f, ns=(2, 2))
    assert store.reload_if_changed() is False
    assert store.lookup("sk-file-b").key_id == "file-b"
    # SIGHUP forces a reload even with the same mtime.
    f.write_text(yaml.safe_dump([entry("file-c", "sk-file-c")]))
    os.utime(f, ns=(2, 2))
    assert store.reload_if_changed(force=True) is True
    assert store.lookup("sk-file-c") is not None and store.lookup("sk-file-b") is None


def test_revocation_wins_for_duplicate_digest() -> None:
    store = ApiKeyStore([ApiKeyConfig(**entry("x", "sk-dup", disabled=True)), ApiKeyConfig(**entry("y", "sk-dup"))])
    assert store.lookup("sk-dup") is None


def test_keys_create_cli_prints_key_and_storable_entry() -> None:
    out = subprocess.run(
        [PY, "-m", "gateway", "keys", "create", "--id", "ci-bot", "--tenant", "team-x", "--models", "tiny,small"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True,
    ).stdout
    key, rest = out.split("\n", 1)
    entries = yaml.safe_load(rest)
    assert entries[0]["id"] == "ci-bot" and entries[0]["sha256"] == digest(key)
    assert key not in rest  # the key itself is printed once, never stored
    store = ApiKeyStore([ApiKeyConfig(**entries[0])])
    p = store.lookup(key)
    assert p is not None and p.tenant == "team-x" and p.models == {"tiny", "small"}
