"""The compiled hot path: which modules are built to C with mypyc, and the guard that never runs a stale build.

The request path (the HTTP server, the upstream client, the proxy, quotas, audit records, metrics, the access
log) is plain, strictly typed Python. ``setup.py`` compiles the modules named in :data:`MODULES` to C
extensions with mypyc (the compiler mypy itself is built with) when the package is installed: the same source,
0.6x the CPU per request of its pure-Python form for whole answers (docs/benchmarks.md).
``PRIVATE_LLM_NATIVE=0`` at install time builds nothing; without a C compiler ``setup.py`` says so in one line
(``scripts/bootstrap`` then keeps the pure-Python form and says so).

An editable checkout keeps each extension next to its ``.py`` file, and Python imports an extension before the
source beside it: after a source edit the old build would run. So the build writes :data:`STAMP`, the digest
of the sources it compiled, and :func:`guard` (called when the ``gateway`` package is imported) compares it
with the sources on disk. When they differ, every module of the set is imported from its source instead (all
of them: compiled modules call each other directly, so mixing old and new code is never safe) and
:func:`status` says so; rebuild with ``scripts/build-native``.

This module and ``gateway/__init__.py`` are never compiled.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules compiled together (one mypyc group): the request path, from the socket to the audit record.
MODULES: tuple[str, ...] = (
    "gateway.accesslog",
    "gateway.admission",
    "gateway.audit.chain",
    "gateway.audit.queue",
    "gateway.audit.record",
    "gateway.audit.sink",
    "gateway.audit.writer",
    "gateway.auth.apikeys",
    "gateway.auth.authenticator",
    "gateway.auth.principal",
    "gateway.context",
    "gateway.errors",
    "gateway.http_server",
    "gateway.logs",
    "gateway.metrics.fast",
    "gateway.metrics.observer",
    "gateway.outcome",
    "gateway.prompt",
    "gateway.proxy.endpoint",
    "gateway.proxy.forward",
    "gateway.proxy.relay",
    "gateway.proxy.request",
    "gateway.proxy.respond",
    "gateway.proxy.sse",
    "gateway.quota.admission",
    "gateway.quota.limits",
    "gateway.quota.memory",
    "gateway.routes",
    "gateway.routing.breaker",
    "gateway.routing.catalog",
    "gateway.routing.pipeline",
    "gateway.routing.pool",
    "gateway.routing.retry",
    "gateway.routing.router",
    "gateway.surface",
    "gateway.upstream",
)
# The mypyc group's shared library (a top-level extension module next to the package).
GROUP = "gateway_native"
# Written by the build into the package: the digest of the sources it compiled.
STAMP = "_native_stamp.txt"

NOT_COMPILED = "pure Python (not compiled)"
_status = NOT_COMPILED


def source_path(root: Path, module: str) -> Path:
    """The source file of ``module`` under ``root`` (the directory that holds the ``gateway`` package)."""
    parts = module.split(".")
    base = root.joinpath(*parts)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def source_digest(root: Path, modules: Sequence[str] = MODULES) -> str:
    """One SHA-256 over the compiled modules' names and sources, in order."""
    h = hashlib.sha256()
    for m in modules:
        h.update(m.encode() + b"\0")
        h.update(source_path(root, m).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _extension(root: Path, module: str) -> Path | None:
    src = source_path(root, module)
    stem = src.parent / "__init__" if src.name == "__init__.py" else src.with_suffix("")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = stem.with_name(stem.name + suffix)
        if p.exists():
            return p
    return None


class _SourceFirst:
    """A meta-path finder that imports the named modules from their ``.py`` files, ignoring any extension."""

    def __init__(self, root: Path, modules: Sequence[str]) -> None:
        self.root = root
        self.modules = frozenset(modules)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        src = source_path(self.root, fullname)
        if src.name == "__init__.py":
            return importlib.util.spec_from_file_location(
                fullname, src, submodule_search_locations=[str(src.parent)]
            )
        return importlib.util.spec_from_file_location(fullname, src)


def check(root: Path, modules: Sequence[str] = MODULES, stamp: str = STAMP) -> tuple[bool, str]:
    """(whether the extensions under ``root`` may be imported, a one-line status)."""
    built = [m for m in modules if _extension(root, m) is not None]
    if not built:
        return False, NOT_COMPILED
    stamp_file = root / modules[0].split(".")[0] / stamp
    try:
        want = stamp_file.read_text().strip()
    except OSError:
        want = ""
    try:
        have = source_digest(root, modules)
    except OSError as e:
        return False, f"pure Python (a compiled module's source is unreadable: {e})"
    if want != have:
        return False, "pure Python (the sources changed since the compiled build: run scripts/build-native)"
    return True, f"compiled (mypyc, {len(built)} modules)"


def guard(root: Path | None = None, modules: Sequence[str] = MODULES, stamp: str = STAMP) -> str:
    """Called on ``import gateway``: keep a fresh build, or import every module of the set from source."""
    global _status
    if root is None:
        root = Path(__file__).resolve().parent.parent
    ok, _status = check(root, modules, stamp)
    if not ok and _status != NOT_COMPILED:  # extensions there, not to be used
        if not any(isinstance(f, _SourceFirst) and f.root == root for f in sys.meta_path):
            sys.meta_path.insert(0, _SourceFirst(root, modules))
    return _status


def status() -> str:
    """How the request path runs in this process: ``compiled (mypyc, N modules)`` or ``pure Python (why)``."""
    return _status
