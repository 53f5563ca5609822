"""The weights manifest: every file of a model directory with its size and sha256, plus a format version.

``push`` uploads it last, so a prefix without a manifest is an unfinished (or never finished) upload and is
never treated as a model. ``pull`` verifies every file against it, and keys its cache by the sha256 of the
manifest's bytes (the same manifest → the same verified directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MANIFEST_NAME = ".llm-engine-manifest.json"
FORMAT = "llm-engine-weights"
VERSION = 1
HASH_BUFFER = 4 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class FileEntry:
    path: str  # POSIX relative path inside the model directory
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    version: int = VERSION

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        """Canonical bytes: the same file list always gives the same bytes (and so the same cache key)."""
        doc = {
            "format": FORMAT,
            "version": self.version,
            "total_size": self.total_size,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in sorted(self.files, key=lambda f: f.path)],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(f"not an {FORMAT} manifest")
        version = doc.get("version")
        if version != VERSION:
            raise ManifestError(f"manifest format version {version!r} is not supported (this llm-engine reads {VERSION})")
        files = doc.get("files")
        if not isinstance(files, list) or not files:
            raise ManifestError("manifest lists no files")
        entries: list[FileEntry] = []
        seen: set[str] = set()
        for item in files:
            if not isinstance(item, dict):
                raise ManifestError("manifest file entries must be objects")
            path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
            check_relpath(path)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ManifestError(f"manifest entry {path!r}: size must be a non-negative integer")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise ManifestError(f"manifest entry {path!r}: sha256 must be 64 lowercase hex digits")
            if path in seen:
                raise ManifestError(f"manifest lists {path!r} twice")
            seen.add(path)
            entries.append(FileEntry(path, size, sha))
        _check_no_file_dir_clash(seen)
        return cls(tuple(entries), version)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_relpath(path: object) -> str:
    """A manifest path must stay inside the model directory: relative, POSIX, no '..', no empty segments."""
    if not isinstance(path, str) or not path:
        raise ManifestError("manifest entry has no path")
    if "\\" in path or "\x00" in path or path.startswith("/"):
        raise ManifestError(f"manifest path {path!r} must be a relative POSIX path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"manifest path {path!r} has an empty, '.' or '..' segment")
    if path == MANIFEST_NAME:
        raise ManifestError(f"manifest path {path!r} is reserved")
    return path


def _check_no_file_dir_clash(paths: set[str]) -> None:
    for p in paths:
        for parent in PurePosixPath(p).parents:
            if str(parent) in paths:
                raise ManifestError(f"manifest path {str(parent)!r} is both a file and a directory")


def iter_model_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every regular file under ``root`` (symlinks followed), sorted;
    skips the manifest itself and VCS/cache folders."""
    root = Path(root)
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".cache", "__pycache__"))
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME or not full.is_file():
                continue
            out.append((rel, full))
    out.sort()
    yield from out


def hash_file(path: Path, buffer: int = HASH_BUFFER) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in large blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(buffer)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()
