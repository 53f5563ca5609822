"""The weights manifest: canonical bytes, strict parsing, safe paths, directory scanning and hashing."""

from __future__ import annotations

import hashlib
import json

import pytest

from engine.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    check_relpath,
    digest,
    hash_file,
    iter_model_files,
)

A = "a" * 64
B = "b" * 64


def doc(files, **over):
    d = {"format": "llm-engine-weights", "version": 1, "files": files}
    d.update(over)
    return json.dumps(d).encode()


def test_round_trip_and_canonical_bytes():
    m = Manifest((FileEntry("z.bin", 3, A), FileEntry("a/config.json", 0, B)))
    data = m.to_bytes()
    back = Manifest.from_bytes(data)
    assert {f.path: (f.size, f.sha256) for f in back.files} == {"z.bin": (3, A), "a/config.json": (0, B)}
    assert back.total_size == 3
    # Order of the input does not change the bytes, so the cache key is stable.
    assert Manifest(tuple(reversed(m.files))).to_bytes() == data
    assert digest(data) == hashlib.sha256(data).hexdigest()
    assert json.loads(data)["total_size"] == 3


@pytest.mark.parametrize(
    "data, message",
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"format": "other", "version": 1, "files": []}).encode(), "not an llm-engine-weights manifest"),
        (doc([{"path": "a", "size": 1, "sha256": A}], version=2), "version 2 is not supported"),
        (doc([]), "lists no files"),
        (doc([{"path": "a", "size": -1, "sha256": A}]), "non-negative integer"),
        (doc([{"path": "a", "size": True, "sha256": A}]), "non-negative integer"),
        (doc([{"path": "a", "size": 1, "sha256": "ABC"}]), "64 lowercase hex"),
        (doc([{"path": "a", "size": 1, "sha256": A}, {"path": "a", "size": 1, "sha256": A}]), "twice"),
        (doc([{"path": "a", "size": 1, "sha256": A}, {"path": "a/b", "size": 1, "sha256": A}]), "both a file and a directory"),
        (doc([{"path": "../etc/passwd", "size": 1, "sha256": A}]), "'..' segment"),
        (doc([{"path": "/abs", "size": 1, "sha256": A}]), "relative POSIX"),
    ],
)
def test_bad_manifests_are_rejected(data, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(data)


@pytest.mark.parametrize("path", ["", "a//b", "./a", "a/./b", "a/..", "..", "a\\b", "/x", MANIFEST_NAME, None, 3])
def test_unsafe_paths(path):
    with pytest.raises(ManifestError):
        check_relpath(path)


@pytest.mark.parametrize("path", ["config.json", "a/b/c.safetensors", ".hidden", "a..b"])
def test_safe_paths(path):
    assert check_relpath(path) == path


def test_iter_model_files_skips_manifest_and_vcs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.json").write_text("{}")
    (tmp_path / "w.bin").write_bytes(b"x")
    (tmp_path / MANIFEST_NAME).write_text("{}")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / "link.bin").symlink_to(tmp_path / "w.bin")
    assert [rel for rel, _ in iter_model_files(tmp_path)] == ["link.bin", "sub/t.json", "w.bin"]


def test_hash_file(tmp_path):
    data = bytes(range(256)) * 50_000
    p = tmp_path / "f"
    p.write_bytes(data)
    assert hash_file(p, buffer=4096) == (len(data), hashlib.sha256(data).hexdigest())
    (tmp_path / "e").write_bytes(b"")
    assert hash_file(tmp_path / "e") == (0, hashlib.sha256(b"").hexdigest())
