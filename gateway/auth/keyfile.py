"""Editing the API key file (``llm-gateway keys create|revoke|rotate``) safely while a gateway reads it.

Every change is write-then-rename: the new content goes to a temporary file in the same directory, is fsynced,
the current file is copied to ``FILE.bak``, and the temporary file replaces ``FILE`` in one ``rename``. A
gateway polling the file (``auth.keys_file_poll_interval``) or reloading on SIGHUP therefore sees the old or
the new file, never half of one. Concurrent edits are serialized with a lock file (``FILE.lock``). Every entry
is validated before anything is written; the file keeps its shape (a list, or a mapping with ``api_keys``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from configkit import one_line
from gateway.settings import ApiKeyConfig


class KeyFileError(ValueError):
    """A one-line problem with the key file or the requested change."""


def load_entries(path: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The entries of the key file and, if the file is a mapping, that mapping (so it can be written back)."""
    p = Path(path)
    if not p.exists():
        raise KeyFileError(f"{path}: key file not found")
    try:
        data = yaml.safe_load(p.read_text()) or []
    except yaml.YAMLError as e:
        raise KeyFileError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    container = None
    if isinstance(data, dict):
        container = data
        data = data.get("api_keys") or []
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise KeyFileError(f"{path}: expected a list of API key entries")
    return data, container


@contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _validate(path: str, entries: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for i, e in enumerate(entries):
        try:
            ApiKeyConfig.model_validate(e)
        except ValidationError as err:
            raise KeyFileError(one_line(err, f"{path}: entry {i}")) from None
        if e["id"] in seen:
            raise KeyFileError(f"{path}: key id '{e['id']}' appears twice")
        seen.add(e["id"])


def _write(path: str, entries: list[dict[str, Any]], container: dict[str, Any] | None) -> None:
    _validate(path, entries)
    if container is not None:
        container = {**container, "api_keys": entries}
    text = yaml.safe_dump(container if container is not None else entries, sort_keys=False)
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if target.exists():
            shutil.copy2(target, str(target) + ".bak")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def add_entry(path: str, entry: dict[str, Any]) -> None:
    """Append ``entry`` (a new key id) to the key file; creates the file if it does not exist."""
    with _locked(path):
        entries, container = load_entries(path) if Path(path).exists() else ([], None)
        if any(e.get("id") == entry["id"] for e in entries):
            raise KeyFileError(
                f"{path}: key id '{entry['id']}' exists already (use `keys rotate {entry['id']}`)"
            )
        _write(path, [*entries, entry], container)


def update_entry(path: str, key_id: str, changes: dict[str, Any]) -> None:
    """Change fields of the entry ``key_id``."""
    with _locked(path):
        entries, container = load_entries(path)
        hit = [e for e in entries if e.get("id") == key_id]
        if not hit:
            ids = ", ".join(str(e.get("id")) for e in entries) or "none"
            raise KeyFileError(f"{path}: no key with id '{key_id}' (ids: {ids})")
        hit[0].update(changes)
        if changes.get("disabled") is False:
            hit[0].pop("disabled", None)
        _write(path, entries, container)
