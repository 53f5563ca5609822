"""llm-engine push/pull against a real S3 server (nanio) on 127.0.0.1.

Every push/pull runs as a subprocess with ``vllm``/``torch``/``transformers`` imports poisoned (they must run in a
slim init container). What a pull really fetched is measured by a TCP proxy between it and the S3 server.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.manifest import MANIFEST_NAME, Manifest
from tests.fixtures_weights import cli_env, engine_cli_argv, run_engine_cli

MiB = 1024 * 1024


def make_model(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A model-like directory: files of random bytes (deterministic per seed and name)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        block = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        with open(p, "wb") as f:
            left = size
            while left:
                # Cheap pseudo-random bytes: a hash chain, 1 MiB at a time.
                chunk = (block * (MiB // 32 + 1))[: min(left, MiB)]
                block = hashlib.sha256(block).digest()
                f.write(chunk)
                left -= len(chunk)
    return root


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def push(model: Path, uri: str, env: dict[str, str], *extra: str) -> None:
    r = run_engine_cli("push", str(model), uri, "--no-progress", *extra, env=env)
    assert r.returncode == 0, r.stderr


def pull_json(uri: str, cache: Path, env: dict[str, str], *extra: str) -> dict:
    r = run_engine_cli("pull", uri, "--cache-dir", str(cache), "--json", "--no-progress", *extra, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    # Progress/info log lines may come first; the failure itself is exactly one line, the last one.
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("llm-engine: error:")]
    assert len(errors) == 1, r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == errors[0]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def via(proxy, env: dict[str, str]) -> dict[str, str]:
    return {**env, "S3_ENDPOINT_URL": proxy.endpoint}


def object_gets(proxy, bucket: str) -> list[str]:
    """Paths of GETs for model files (the manifest's own GET excluded)."""
    return [p for m, p, _ in proxy.requests() if m == "GET" and p.startswith(f"/{bucket}/") and MANIFEST_NAME not in p]


def test_push_pull_round_trip(tmp_path, s3_server, s3_bucket, s3_env, s3_proxy):
    model = make_model(tmp_path / "m", {"config.json": 300, "model-00001.safetensors": 12 * MiB + 17,
                                        "model-00002.safetensors": 3 * MiB, "sub/tokenizer.json": 5000, "empty.txt": 0})
    uri = f"s3://{s3_bucket}/org/model-a"
    push(model, uri, via(s3_proxy, s3_env), "--part-size-mb", "5")

    # Order on the wire: the old manifest is deleted first, every file is written, the manifest is written last.
    writes = [(m, p.split("?")[0]) for m, p, _ in s3_proxy.requests() if m in ("PUT", "POST", "DELETE")]
    manifest_path = f"/{s3_bucket}/org/model-a/{MANIFEST_NAME}"
    assert writes[0] == ("DELETE", manifest_path)
    assert writes[-1] == ("PUT", manifest_path)
    assert [w for w in writes if w[1] == manifest_path] == [writes[0], writes[-1]]
    assert {p for _, p in writes[1:-1]} == {f"/{s3_bucket}/org/model-a/{p.relative_to(model).as_posix()}"
                                           for p in model.rglob("*") if p.is_file()}

    client = s3_server.client()
    # The manifest lists every file with its size and sha256 (computed here independently).
    raw = client.get_object(s3_bucket, f"org/model-a/{MANIFEST_NAME}").read()
    doc = json.loads(raw)
    assert doc["version"] == 1
    listed = {f["path"]: (f["size"], f["sha256"]) for f in doc["files"]}
    assert listed == {p.relative_to(model).as_posix(): (p.stat().st_size, sha(p)) for p in model.rglob("*") if p.is_file()}
    # The large file went up in parts (multipart ETag: "<md5 of part md5s>-<count>").
    big = client.stat_object(s3_bucket, "org/model-a/model-00001.safetensors")
    assert big.etag.endswith("-3"), big.etag

    out = pull_json(uri, tmp_path / "cache", s3_env)
    got = Path(out["path"])
    assert got.parent == tmp_path / "cache" / "models"
    assert got.name == out["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    for p in model.rglob("*"):
        if p.is_file():
            assert (got / p.relative_to(model)).read_bytes() == p.read_bytes()
    assert out["downloaded_bytes"] == sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert out["cache_hit"] is False and out["resumed_bytes"] == 0
    # Nothing left in staging.
    assert list((tmp_path / "cache" / "staging").iterdir()) == []


def test_second_pull_is_a_cache_hit_without_object_gets(tmp_path, s3_server, s3_bucket, s3_env, s3_proxy):
    model = make_model(tmp_path / "m", {"config.json": 100, "w.safetensors": 2 * MiB})
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    first = pull_json(uri, tmp_path / "cache", via(s3_proxy, s3_env))
    assert sorted(object_gets(s3_proxy, s3_bucket)) == [f"/{s3_bucket}/m/config.json", f"/{s3_bucket}/m/w.safetensors"]

    s3_proxy.reset()
    second = pull_json(uri, tmp_path / "cache", via(s3_proxy, s3_env))
    assert second["path"] == first["path"] and second["cache_hit"] is True
    assert second["object_gets"] == 0 and second["downloaded_bytes"] == 0
    assert object_gets(s3_proxy, s3_bucket) == []  # only the manifest was read
    assert any(MANIFEST_NAME in p for m, p, _ in s3_proxy.requests() if m == "GET")

    # And with the model's objects gone from S3 (manifest kept), the cached copy is still what is served.
    client = s3_server.client()
    client.remove_object(s3_bucket, "m/config.json")
    client.remove_object(s3_bucket, "m/w.safetensors")
    third = pull_json(uri, tmp_path / "cache", s3_env)
    assert third["path"] == first["path"] and third["cache_hit"] is True


def test_altered_object_fails_naming_the_file_and_both_digests(tmp_path, s3_server, s3_bucket, s3_env):
    model = make_model(tmp_path / "m", {"config.json": 100, "model.safetensors": 3 * MiB})
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    original = model / "model.safetensors"
    altered = bytearray(original.read_bytes())
    altered[1_000_000] ^= 0xFF  # same size, one byte different
    s3_server.client().put_object(s3_bucket, "m/model.safetensors", io.BytesIO(bytes(altered)), len(altered))

    cache = tmp_path / "cache"
    r = run_engine_cli("pull", uri, "--cache-dir", str(cache), "--no-progress", env=s3_env)
    line = assert_one_line_error(r, "model.safetensors", sha(original), hashlib.sha256(altered).hexdigest())
    assert "mismatch" in line
    # Nothing was published, and the bad bytes were not kept.
    assert list((cache / "models").iterdir()) == []
    assert not list(cache.rglob("model.safetensors"))


def _part_file(cache: Path, name: str) -> Path | None:
    found = list((cache / "staging").glob(f"*/parts/{name}")) if (cache / "staging").exists() else []
    return found[0] if found else None


def test_pull_killed_mid_file_resumes_with_only_the_remaining_bytes(tmp_path, s3_bucket, s3_env, s3_proxy):
    size = 24 * MiB
    model = make_model(tmp_path / "m", {"config.json": 100, "big.safetensors": size})
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    cache = tmp_path / "cache"

    # A throttled pull (4 MB/s), SIGKILLed once it has part of the big file on disk.
    proc = subprocess.Popen(engine_cli_argv("pull", uri, "--cache-dir", str(cache), "--no-progress", "--max-rate-mbps", "4"),
                            env=cli_env(s3_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            part = _part_file(cache, "big.safetensors")
            if part is not None and part.stat().st_size >= 4 * MiB:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the pull never got 4 MiB into the big file")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    partial = _part_file(cache, "big.safetensors").stat().st_size
    assert 0 < partial < size
    assert list((cache / "models").iterdir()) == []  # nothing half-done was published

    small_done = bool(list(cache.glob("staging/*/files/config.json")))  # finished (and verified) before the kill

    out = pull_json(uri, cache, via(s3_proxy, s3_env))
    remaining = size - partial
    assert out["reused_files"] == int(small_done)
    assert out["resumed_bytes"] == partial + (100 if small_done else 0)
    assert out["downloaded_bytes"] == remaining + (0 if small_done else 100)
    # The server really sent only the rest: one ranged GET from the partial's end, and about `remaining` bytes.
    big_gets = [h for m, p, h in s3_proxy.requests() if m == "GET" and p.endswith("/big.safetensors")]
    assert [h.get("range") for h in big_gets] == [f"bytes={partial}-"]
    assert remaining + (0 if small_done else 100) <= s3_proxy.bytes_down < remaining + 64 * 1024
    assert sha(Path(out["path"]) / "big.safetensors") == sha(model / "big.safetensors")


def test_connection_dropped_mid_file_resumes_in_the_same_run(tmp_path, s3_bucket, s3_env, s3_proxy):
    size = 8 * MiB
    model = make_model(tmp_path / "m", {"big.safetensors": size})
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    s3_proxy.cut_after = 3 * MiB  # the S3 connection breaks 3 MiB into the file
    out = pull_json(uri, tmp_path / "cache", via(s3_proxy, s3_env))
    assert s3_proxy.cut_after is None  # the fault did happen
    ranges = [h.get("range") for m, p, h in s3_proxy.requests() if m == "GET" and p.endswith("/big.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")
    resumed_at = int(ranges[1][len("bytes="):-1])
    assert 0 < resumed_at < 3 * MiB
    assert out["object_gets"] == 2 and out["downloaded_bytes"] == size
    assert sha(Path(out["path"]) / "big.safetensors") == sha(model / "big.safetensors")


def test_two_concurrent_pulls_end_with_one_verified_copy(tmp_path, s3_bucket, s3_env, s3_proxy):
    size = 12 * MiB
    model = make_model(tmp_path / "m", {"config.json": 100, "a.safetensors": size})
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    cache = tmp_path / "cache"
    argv = engine_cli_argv("pull", uri, "--cache-dir", str(cache), "--json", "--no-progress", "--max-rate-mbps", "8")
    procs = [subprocess.Popen(argv, env=cli_env(via(s3_proxy, s3_env)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout))
    assert outs[0]["path"] == outs[1]["path"]
    assert [p.name for p in (cache / "models").iterdir()] == [Path(outs[0]["path"]).name]
    assert list((cache / "staging").iterdir()) == []
    # One downloaded, the other waited on the lock and found the published copy.
    assert sorted(o["cache_hit"] for o in outs) == [False, True]
    waiter = next(o for o in outs if o["cache_hit"])
    assert waiter["object_gets"] == 0 and waiter["downloaded_bytes"] == 0
    assert s3_proxy.bytes_down < size * 1.1  # the model crossed the wire once
    got = Path(outs[0]["path"])
    manifest = Manifest.from_bytes((got / MANIFEST_NAME).read_bytes())
    from engine.weights import verify_dir

    verify_dir(got, manifest)


def test_wrong_secret_key_is_a_clear_error(tmp_path, s3_bucket, s3_env):
    model = make_model(tmp_path / "m", {"config.json": 100})
    push(model, f"s3://{s3_bucket}/m", s3_env)
    bad = {**s3_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = run_engine_cli("pull", f"s3://{s3_bucket}/m", "--cache-dir", str(tmp_path / "c"), env=bad)
    assert_one_line_error(r, "rejected the credentials", "AWS_SECRET_ACCESS_KEY")
    r = run_engine_cli("push", str(model), f"s3://{s3_bucket}/m2", env=bad)
    assert_one_line_error(r, "rejected the credentials")
    assert "not-the-secret" not in r.stderr


def test_missing_bucket_is_a_clear_error(tmp_path, s3_env):
    r = run_engine_cli("pull", "s3://no-such-bucket-here/m", "--cache-dir", str(tmp_path / "c"), env=s3_env)
    assert_one_line_error(r, "bucket 'no-such-bucket-here' does not exist")
    model = make_model(tmp_path / "m", {"config.json": 100})
    r = run_engine_cli("push", str(model), "s3://no-such-bucket-here/m", env=s3_env)
    assert_one_line_error(r, "bucket 'no-such-bucket-here' does not exist")


def test_prefix_without_manifest_is_never_a_model(tmp_path, s3_server, s3_bucket, s3_env):
    # The objects of a push that died before its last step: everything but the manifest.
    s3_server.client().put_object(s3_bucket, "half/model.safetensors", io.BytesIO(b"x" * 1000), 1000)
    r = run_engine_cli("pull", f"s3://{s3_bucket}/half", "--cache-dir", str(tmp_path / "c"), env=s3_env)
    assert_one_line_error(r, "no manifest", f"s3://{s3_bucket}/half/{MANIFEST_NAME}")
    assert not (tmp_path / "c" / "models").exists() or list((tmp_path / "c" / "models").iterdir()) == []


def test_repush_removes_the_old_manifest_first(tmp_path, s3_server, s3_bucket, s3_env):
    """A push that fails midway leaves the prefix without a manifest, even if an older push had one."""
    model = make_model(tmp_path / "m", {"config.json": 100})
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    # S3 keys are at most 1024 bytes: this file's upload is refused, after the old manifest was removed.
    deep = model.joinpath(*(["d" * 200] * 6))
    deep.mkdir(parents=True)
    (deep / "w.bin").write_bytes(b"x")
    r = run_engine_cli("push", str(model), uri, env=s3_env)
    assert_one_line_error(r, "w.bin")
    r = run_engine_cli("pull", uri, "--cache-dir", str(tmp_path / "c"), env=s3_env)
    assert_one_line_error(r, "no manifest")


def test_unreachable_endpoint_is_a_clear_error(tmp_path, s3_env):
    from tests.support import free_port

    env = {**s3_env, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    r = run_engine_cli("pull", "s3://bucket/m", "--cache-dir", str(tmp_path / "c"), env=env)
    assert_one_line_error(r, "cannot reach S3 endpoint")


def test_missing_object_listed_in_manifest_is_named(tmp_path, s3_server, s3_bucket, s3_env):
    model = make_model(tmp_path / "m", {"config.json": 100, "w.safetensors": 1000})
    push(model, f"s3://{s3_bucket}/m", s3_env)
    s3_server.client().remove_object(s3_bucket, "m/w.safetensors")
    r = run_engine_cli("pull", f"s3://{s3_bucket}/m", "--cache-dir", str(tmp_path / "c"), env=s3_env)
    assert_one_line_error(r, "w.safetensors", "missing")


def test_engine_run_resolves_model_and_lora_from_s3(tmp_path, s3_bucket, s3_env):
    """ENGINE_MODEL and ENGINE_LORA_MODULES as s3:// URIs are pulled, verified, and handed to vLLM as local dirs."""
    base = make_model(tmp_path / "base", {"config.json": 100, "model.safetensors": 1000})
    lora = make_model(tmp_path / "lora", {"adapter_config.json": 50, "adapter_model.safetensors": 500}, seed=1)
    push(base, f"s3://{s3_bucket}/models/base-7b", s3_env)
    push(lora, f"s3://{s3_bucket}/adapters/sql", s3_env)
    cache = tmp_path / "cache"
    env = {**s3_env, "ENGINE_MODEL": f"s3://{s3_bucket}/models/base-7b", "ENGINE_CACHE_DIR": str(cache),
           "ENGINE_LORA_MODULES": f"sql=s3://{s3_bucket}/adapters/sql", "ENGINE_DEVICE": "cpu"}
    r = subprocess.run(engine_cli_argv("run", "--dry-run"), env=cli_env(env), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    published = {p.name: p for p in (cache / "models").iterdir()}
    assert len(published) == 2
    lora_dir = next(p for p in published.values() if (p / "adapter_config.json").exists())
    base_dir = next(p for p in published.values() if (p / "config.json").exists())
    assert f"sql={lora_dir}" in cmd
    assert str(base_dir) in cmd
    assert cmd[cmd.index("--served-model-name") + 1] == "base-7b"

    # A LoRA URI with nothing behind it stops the engine with one clear line.
    env["ENGINE_LORA_MODULES"] = f"sql=s3://{s3_bucket}/adapters/none"
    r = subprocess.run(engine_cli_argv("run", "--dry-run"), env=cli_env(env), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no manifest" in r.stderr and "Traceback" not in r.stderr


def test_tls_endpoint_with_ca_bundle(tmp_path, s3_server, s3_bucket, s3_env, tls_ca):
    """https:// in the endpoint turns TLS on; AWS_CA_BUNDLE names the CA; without it the failure is one line."""
    from tests.fixtures_weights import CountingProxy

    ca_pem, server_ctx = tls_ca
    proxy = CountingProxy(s3_server.port, tls=server_ctx)
    try:
        model = make_model(tmp_path / "m", {"config.json": 100, "w.safetensors": 6 * MiB})
        env = {**s3_env, "S3_ENDPOINT_URL": proxy.endpoint, "AWS_CA_BUNDLE": str(ca_pem)}
        assert env["S3_ENDPOINT_URL"].startswith("https://")
        push(model, f"s3://{s3_bucket}/m", env, "--part-size-mb", "5")
        out = pull_json(f"s3://{s3_bucket}/m", tmp_path / "cache", env)
        assert (Path(out["path"]) / "w.safetensors").read_bytes() == (model / "w.safetensors").read_bytes()
        assert proxy.bytes_down > 6 * MiB  # it really went through the TLS endpoint

        no_ca = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}
        r = run_engine_cli("pull", f"s3://{s3_bucket}/m", "--cache-dir", str(tmp_path / "c2"), env=no_ca)
        assert_one_line_error(r, "TLS", "AWS_CA_BUNDLE")
    finally:
        proxy.close()


def test_repush_sends_only_changed_files_and_pull_sees_the_new_version(tmp_path, s3_bucket, s3_env, s3_proxy):
    model = make_model(tmp_path / "m", {"config.json": 100, "a.safetensors": 6 * MiB, "b.safetensors": 2 * MiB})
    uri = f"s3://{s3_bucket}/m"
    cache = tmp_path / "cache"
    r = run_engine_cli("push", str(model), uri, "--json", "--no-progress", "--part-size-mb", "5", env=s3_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["uploaded_files"] == 3
    v1 = pull_json(uri, cache, s3_env)

    (model / "b.safetensors").write_bytes(os.urandom(2 * MiB))
    r = run_engine_cli("push", str(model), uri, "--json", "--no-progress", env=via(s3_proxy, s3_env))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["uploaded_files"], out["skipped_files"], out["uploaded_bytes"]) == (1, 2, 2 * MiB)
    puts = [p for m, p, _ in s3_proxy.requests() if m in ("PUT", "POST") and MANIFEST_NAME not in p]
    assert puts and all("/m/b.safetensors" in p for p in puts), puts

    s3_proxy.reset()
    v2 = pull_json(uri, cache, via(s3_proxy, s3_env))
    assert v2["path"] != v1["path"] and v2["manifest_sha256"] == out["manifest_sha256"]
    # The unchanged files are taken from the verified v1 copy: only the changed one is downloaded.
    assert object_gets(s3_proxy, s3_bucket) == [f"/{s3_bucket}/m/b.safetensors"]
    assert v2["downloaded_bytes"] == 2 * MiB and v2["reused_files"] == 2
    assert (Path(v2["path"]) / "a.safetensors").read_bytes() == (model / "a.safetensors").read_bytes()
    assert (Path(v2["path"]) / "b.safetensors").read_bytes() == (model / "b.safetensors").read_bytes()
    # --force sends everything again.
    r = run_engine_cli("push", str(model), uri, "--json", "--no-progress", "--force", env=s3_env)
    assert json.loads(r.stdout)["uploaded_files"] == 3


# ------------------------------------------------------------------ the cache when S3 is down, re-verification


@pytest.fixture
def own_s3():
    """A nanio server this test may stop and start again (same port, same objects)."""
    from tests.support import S3Server

    servers = [S3Server().wait_ready()]

    class Handle:
        @property
        def server(self) -> S3Server:
            return servers[-1]

        def stop(self) -> None:
            servers[-1].stop()

        def start(self) -> None:
            old = servers[-1]
            servers.append(S3Server(port=old.port, data_dir=old.data_dir).wait_ready())

    try:
        yield Handle()
    finally:
        servers[-1].stop()


def _flip_byte_keep_mtime(path: Path, offset: int) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_pull_starts_from_the_verified_copy_while_s3_is_down(tmp_path, own_s3):
    s3 = own_s3.server
    s3.client().make_bucket("models")
    model = make_model(tmp_path / "m", {"config.json": 100, "model.safetensors": 2 * MiB})
    uri = "s3://models/org/m"
    push(model, uri, s3.env())
    cache = tmp_path / "cache"
    first = pull_json(uri, cache, s3.env())
    assert first["source_unreachable"] is False
    own_s3.stop()

    # S3 down: the last verified copy is used, with a warning naming the source and the reason.
    r = run_engine_cli("pull", uri, "--cache-dir", str(cache), "--json", "--no-progress", env=s3.env())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["path"] == first["path"] and out["cache_hit"] is True and out["source_unreachable"] is True
    assert out["object_gets"] == 0 and out["downloaded_bytes"] == 0
    warnings = [ln for ln in r.stderr.splitlines() if "WARNING" in ln and "S3 unreachable" in ln]
    assert len(warnings) == 1 and "s3://models/org/m" in warnings[0] and "cannot reach S3 endpoint" in warnings[0]
    # `llm-engine run` resolves the model the same way (dry run: prints vLLM's command with the cached dir).
    env = {**s3.env(), "ENGINE_MODEL": uri, "ENGINE_CACHE_DIR": str(cache), "ENGINE_DEVICE": "cpu"}
    r = subprocess.run(engine_cli_argv("run", "--dry-run"), env=cli_env(env), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert first["path"] in r.stdout.split()

    # ... unless the operator requires the source (flag or environment).
    r = run_engine_cli("pull", uri, "--cache-dir", str(cache), "--require-source", env=s3.env())
    assert_one_line_error(r, "cannot reach S3 endpoint", "--require-source")
    r = run_engine_cli("pull", uri, "--cache-dir", str(cache), env={**s3.env(), "ENGINE_REQUIRE_SOURCE": "true"})
    assert_one_line_error(r, "cannot reach S3 endpoint", "ENGINE_REQUIRE_SOURCE")
    r = subprocess.run(engine_cli_argv("run", "--dry-run"), env=cli_env({**env, "ENGINE_REQUIRE_SOURCE": "1"}),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--require-source" in r.stderr and "Traceback" not in r.stderr
    # A source never verified on this node has nothing to fall back to.
    r = run_engine_cli("pull", "s3://models/org/other", "--cache-dir", str(cache), env=s3.env())
    assert_one_line_error(r, "cannot reach S3 endpoint", "no verified copy of s3://models/org/other")

    # Back up: the source answers again and is what the pull goes by.
    own_s3.start()
    out = pull_json(uri, cache, s3.env())
    assert out["source_unreachable"] is False and out["cache_hit"] is True and out["path"] == first["path"]


def test_unreachable_source_sets_the_engine_metric(tmp_path, own_s3):
    from engine import metrics
    from engine.s3 import config_from_env
    from engine.weights import pull_model

    s3 = own_s3.server
    s3.client().make_bucket("models")
    push(make_model(tmp_path / "m", {"config.json": 100}), "s3://models/x", s3.env())
    cfg = config_from_env(s3.env())

    def gauge() -> float | None:
        return metrics.REGISTRY.get_sample_value("llm_engine_weights_source_unreachable", {"source": "s3://models/x"})

    pull_model("s3://models/x", tmp_path / "cache", cfg=cfg, live_progress=False)
    assert gauge() == 0
    own_s3.stop()
    r = pull_model("s3://models/x", tmp_path / "cache", cfg=cfg, live_progress=False)
    assert r.stats.source_unreachable and gauge() == 1
    own_s3.start()
    pull_model("s3://models/x", tmp_path / "cache", cfg=cfg, live_progress=False)
    assert gauge() == 0


def test_verify_cache_modes_find_a_corrupted_cached_file(tmp_path, s3_bucket, s3_env, s3_proxy):
    model = make_model(tmp_path / "m", {"config.json": 100, "a.safetensors": 3 * MiB, "model.safetensors": 2 * MiB})
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    cache = tmp_path / "cache"
    first = pull_json(uri, cache, s3_env)
    cached = Path(first["path"]) / "model.safetensors"

    # One flipped bit, size and mtime kept: `size` trusts the recorded fingerprint, `full` re-hashes and finds it.
    _flip_byte_keep_mtime(cached, 1_000_000)
    out = pull_json(uri, cache, s3_env)  # default: size
    assert out["cache_hit"] is True and out["verify_cache"] == "size" and out["rehashed_files"] == 0
    out = pull_json(uri, cache, s3_env, "--verify-cache", "none")
    assert out["cache_hit"] is True and out["rehashed_files"] == 0

    s3_proxy.reset()
    out = pull_json(uri, cache, via(s3_proxy, s3_env), "--verify-cache", "full")
    # Evicted and repaired: only the bad file crossed the wire again, the good ones were kept.
    assert out["evicted"] is True and out["cache_hit"] is False and out["path"] == first["path"]
    assert out["rehashed_files"] == 3 and out["rehashed_bytes"] == 100 + 5 * MiB
    assert object_gets(s3_proxy, s3_bucket) == [f"/{s3_bucket}/m/model.safetensors"]
    assert out["downloaded_bytes"] == 2 * MiB and out["reused_files"] == 2
    assert sha(cached) == sha(model / "model.safetensors")
    assert list((cache / "staging").iterdir()) == []

    # A changed mtime makes `size` re-hash that one file; a changed size needs no hashing at all.
    _flip_byte_keep_mtime(cached, 5)
    os.utime(cached, ns=(cached.stat().st_atime_ns, cached.stat().st_mtime_ns + 1_000_000_000))
    out = pull_json(uri, cache, s3_env, "--verify-cache", "size")
    assert out["evicted"] is True and out["rehashed_files"] == 1 and out["downloaded_bytes"] == 2 * MiB
    out = pull_json(uri, cache, s3_env)  # repaired copy, fingerprint recorded again: nothing to hash
    assert out["cache_hit"] is True and out["rehashed_files"] == 0
    with open(Path(first["path"]) / "a.safetensors", "r+b") as f:
        f.truncate(MiB)
    out = pull_json(uri, cache, s3_env, "--verify-cache", "size")
    assert out["evicted"] is True and out["rehashed_files"] == 0 and out["downloaded_bytes"] == 3 * MiB
    from engine.weights import verify_dir

    verify_dir(out["path"], Manifest.from_bytes((Path(out["path"]) / MANIFEST_NAME).read_bytes()))

    # A bad value is one line.
    r = run_engine_cli("pull", uri, "--cache-dir", str(cache), "--verify-cache", "sometimes", env=s3_env)
    assert_one_line_error(r, "--verify-cache", "none, size, full", "sometimes")


def test_corrupted_cache_with_s3_down_fails_naming_the_file(tmp_path, own_s3):
    s3 = own_s3.server
    s3.client().make_bucket("models")
    model = make_model(tmp_path / "m", {"config.json": 100, "model.safetensors": 2 * MiB})
    push(model, "s3://models/m", s3.env())
    cache = tmp_path / "cache"
    first = pull_json("s3://models/m", cache, s3.env())
    own_s3.stop()
    _flip_byte_keep_mtime(Path(first["path"]) / "model.safetensors", 77)
    r = run_engine_cli("pull", "s3://models/m", "--cache-dir", str(cache), "--verify-cache", "full", env=s3.env())
    assert_one_line_error(r, "model.safetensors", "sha256 mismatch", "S3 is unreachable")
    assert list((cache / "models").iterdir()) == []  # nothing bad stays published
    # Still down: nothing left to start from.
    r = run_engine_cli("pull", "s3://models/m", "--cache-dir", str(cache), env=s3.env())
    assert_one_line_error(r, "no verified copy")
    # Back up: only the bad file is downloaded again.
    own_s3.start()
    out = pull_json("s3://models/m", cache, s3.env())
    assert out["path"] == first["path"] and out["downloaded_bytes"] == 2 * MiB and out["reused_files"] == 1


def test_after_a_failed_pull_the_next_downloads_only_what_is_missing(tmp_path, s3_server, s3_bucket, s3_env, s3_proxy):
    sizes = {"config.json": 300, "tokenizer.json": 40_000, "a.safetensors": 3 * MiB, "b.safetensors": 2 * MiB,
             "c.safetensors": MiB + 5, "d.safetensors": MiB, "z-missing.bin": 200}
    model = make_model(tmp_path / "m", sizes)
    uri = f"s3://{s3_bucket}/m"
    push(model, uri, s3_env)
    client = s3_server.client()
    client.remove_object(s3_bucket, "m/z-missing.bin")
    cache = tmp_path / "cache"
    # Smallest last with one file at a time: everything else is downloaded and verified before the failure.
    r = run_engine_cli("pull", uri, "--cache-dir", str(cache), "--concurrency", "1", "--no-progress", env=s3_env)
    assert_one_line_error(r, "z-missing.bin", "missing")

    client.fput_object(s3_bucket, "m/z-missing.bin", str(model / "z-missing.bin"))
    s3_proxy.reset()
    out = pull_json(uri, cache, via(s3_proxy, s3_env))
    assert object_gets(s3_proxy, s3_bucket) == [f"/{s3_bucket}/m/z-missing.bin"]
    assert out["object_gets"] == 1 and out["downloaded_bytes"] == 200
    assert out["reused_files"] == len(sizes) - 1
    assert s3_proxy.bytes_down < 64 * 1024  # the manifest and one small object, nothing else
    for name in sizes:
        assert sha(Path(out["path"]) / name) == sha(model / name)
