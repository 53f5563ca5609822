"""`llm-gateway keys list|create|revoke|rotate` edit the key file atomically (write-then-rename, FILE.bak kept);
a running gateway picks each change up through its key-file watch. `create` stores only the digest and prints
the key once, on stdout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from gateway.auth.apikeys import digest
from tests.support import REPO

PY = sys.executable


def keys(*args: str, keyfile: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(REPO)
    if keyfile is not None:
        env["GATEWAY_API_KEYS_FILE"] = str(keyfile)
    return subprocess.run(
        [PY, "-m", "gateway", "keys", *args], capture_output=True, text=True, env=env, timeout=60
    )


def status(gw, key: str) -> int:
    return httpx.get(
        gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).status_code


def wait_status(gw, key: str, want: int) -> int:
    deadline = time.monotonic() + 20
    while (got := status(gw, key)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_create_list_revoke_rotate_against_a_running_gateway(tmp_path: Path, gateway_factory) -> None:
    keyfile = tmp_path / "api-keys.yaml"
    r = keys("create", "--id", "app1", "--tenant", "team-a", "--models", "tiny", "--file", str(keyfile))
    assert r.returncode == 0, r.stderr
    key1 = r.stdout.strip()
    assert r.stdout == key1 + "\n" and key1.startswith("sk-")  # only the key on stdout, once
    assert key1 not in r.stderr and key1 not in keyfile.read_text()
    entries = yaml.safe_load(keyfile.read_text())
    assert entries == [{"id": "app1", "sha256": digest(key1), "tenant": "team-a", "models": ["tiny"]}]
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"

    gw = gateway_factory(
        {
            "models": [{"name": "tiny", "upstreams": ["http://127.0.0.1:9"]}],
            "api_keys_file": str(keyfile),
            "auth": {"keys_file_poll_interval": 0.2},
        }
    )
    assert status(gw, key1) == 200

    # a second key through GATEWAY_API_KEYS_FILE; the previous file is kept as a backup
    r = keys("create", "--id", "app2", keyfile=keyfile)
    key2 = r.stdout.strip()
    assert r.returncode == 0 and yaml.safe_load((tmp_path / "api-keys.yaml.bak").read_text()) == entries
    assert wait_status(gw, key2, 200) == 200

    r = keys("create", "--id", "app2", keyfile=keyfile)
    assert r.returncode == 1 and "exists already" in r.stderr and r.stdout == ""

    r = keys("list", keyfile=keyfile)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "TENANT", "SUBJECT", "MODELS", "STATE"]
    assert [ln.split()[0] for ln in lines[1:]] == ["app1", "app2"] and "active" in lines[1]
    assert key1 not in r.stdout and digest(key1) not in r.stdout  # a digest prefix at most

    r = keys("revoke", "app1", keyfile=keyfile)
    assert r.returncode == 0, r.stderr
    assert wait_status(gw, key1, 401) == 401
    assert "revoked" in keys("list", keyfile=keyfile).stdout.splitlines()[1]

    r = keys("rotate", "app2", keyfile=keyfile)
    assert r.returncode == 0, r.stderr
    key2b = r.stdout.strip()
    assert key2b != key2 and key2b not in keyfile.read_text()
    assert wait_status(gw, key2, 401) == 401
    assert status(gw, key2b) == 200

    r = keys("revoke", "nope", keyfile=keyfile)
    assert r.returncode == 1 and "no key with id 'nope'" in r.stderr and "app1, app2" in r.stderr
    assert gw.proc.proc.poll() is None
    assert not list(tmp_path.glob(".api-keys.yaml.*")), "no temporary files left behind"


def test_key_file_shape_and_errors(tmp_path: Path) -> None:
    # a mapping with api_keys keeps its shape
    keyfile = tmp_path / "keys.yaml"
    keyfile.write_text(yaml.safe_dump({"api_keys": [{"id": "a", "sha256": "a" * 64}]}))
    r = keys("create", "--id", "b", "--file", str(keyfile))
    assert r.returncode == 0
    data = yaml.safe_load(keyfile.read_text())
    assert [e["id"] for e in data["api_keys"]] == ["a", "b"]
    # no key file anywhere: the key and the entry to paste, both on stdout
    r = keys("create", "--id", "c")
    key, rest = r.stdout.split("\n", 1)
    assert r.returncode == 0 and yaml.safe_load(rest)[0]["sha256"] == digest(key) and r.stderr == ""
    assert keys("create", "--id", "c", "--quiet").stdout.count("\n") == 1
    # list/revoke need a file
    r = keys("list")
    assert r.returncode != 0 and "GATEWAY_API_KEYS_FILE" in r.stderr
    # an invalid file is refused without being touched
    keyfile.write_text("- {id: x, sha256: not-hex}\n")
    r = keys("revoke", "x", "--file", str(keyfile))
    assert r.returncode == 1 and "sha256" in r.stderr
    assert keyfile.read_text() == "- {id: x, sha256: not-hex}\n"
