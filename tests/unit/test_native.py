"""The compiled request path (gateway/native.py): a build is used only while it matches its sources.

The guard is exercised on a package made here (a stand-in extension file that would fail to import, so a
guard that let it through fails the test), and on this checkout: when the package was built (scripts/test
and the images build it), the modules of the set must be the compiled ones.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gateway
from gateway import native

ROOT = Path(gateway.__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """``pkg`` with two modules, a stand-in extension for one, and the stamp a build would write."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fast.py").write_text("WHERE = 'source'\n")
    (pkg / "sub" / "__init__.py").write_text("WHERE = 'source'\n")
    (pkg / f"fast{SUFFIX}").write_bytes(b"not a real extension")
    modules = ("pkg.fast", "pkg.sub")
    (pkg / native.STAMP).write_text(native.source_digest(tmp_path, modules) + "\n")
    return pkg, modules


def test_a_fresh_build_is_kept(tmp_path: Path) -> None:
    _, modules = _package(tmp_path)
    ok, status = native.check(tmp_path, modules)
    assert ok and status == "compiled (mypyc, 1 modules)"


@pytest.mark.parametrize("change", ["edit", "no_stamp", "other_stamp"])
def test_a_stale_build_is_never_imported(tmp_path: Path, change: str) -> None:
    pkg, modules = _package(tmp_path)
    if change == "edit":
        (pkg / "sub" / "__init__.py").write_text("WHERE = 'edited source'\n")
    elif change == "no_stamp":
        (pkg / native.STAMP).unlink()
    else:
        (pkg / native.STAMP).write_text("0" * 64 + "\n")
    ok, status = native.check(tmp_path, modules)
    assert not ok and "changed since the compiled build" in status
    # Imported in a fresh interpreter with the guard on: the broken stand-in extension is skipped for the source.
    code = textwrap.dedent(
        f"""
        import pathlib, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from gateway import native
        print(native.guard(pathlib.Path({str(tmp_path)!r}), {modules!r}))
        import pkg.fast, pkg.sub
        print(pkg.fast.WHERE, pkg.fast.__file__.endswith('.py'), pkg.sub.WHERE)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.splitlines()
    assert out[0].startswith("pure Python (the sources changed")
    assert out[1] == ("source True edited source" if change == "edit" else "source True source")


def test_nothing_built_is_pure_python(tmp_path: Path) -> None:
    pkg, modules = _package(tmp_path)
    (pkg / f"fast{SUFFIX}").unlink()
    assert native.check(tmp_path, modules) == (False, "pure Python (not compiled)")
    assert not any(isinstance(f, native._SourceFirst) and f.root == tmp_path for f in sys.meta_path)


def test_the_set_names_existing_modules_of_the_package() -> None:
    assert len(set(native.MODULES)) == len(native.MODULES)
    for m in native.MODULES:
        assert m.startswith("gateway.") and native.source_path(ROOT, m).is_file(), m
    # Never compiled: the guard itself, and the package's __init__ that calls it.
    assert "gateway.native" not in native.MODULES and "gateway" not in native.MODULES


def test_this_checkout_runs_its_build_when_there_is_one() -> None:
    built = [m for m in native.MODULES if native._extension(ROOT, m) is not None]
    if not built:
        pytest.skip("the request path is not compiled here (PRIVATE_LLM_NATIVE=0 or no build)")
    ok, status = native.check(ROOT)
    assert ok, status  # scripts/test rebuilds a stale build before the suite
    assert native.status() == status
    import gateway.http_server
    import gateway.proxy.endpoint

    for mod in (gateway.http_server, gateway.proxy.endpoint):
        assert mod.__file__ is not None and mod.__file__.endswith(SUFFIX), mod.__file__


def test_build_native_off_removes_the_build(tmp_path: Path) -> None:
    """``PRIVATE_LLM_NATIVE=0 scripts/build-native``: the extensions, the group library and the stamp go; the
    package then imports as pure Python (run on a copy of the checkout's layout)."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "build-native"
    script.write_bytes((ROOT / "scripts" / "build-native").read_bytes())
    script.chmod(0o755)
    pkg, modules = _package(tmp_path)
    (pkg.parent / "gateway").mkdir()
    made = [
        tmp_path / "gateway" / f"http_server{SUFFIX}",
        tmp_path / f"{native.GROUP}__mypyc{SUFFIX}",
        tmp_path / "gateway" / native.STAMP,
    ]
    for p in made:
        p.write_bytes(b"x")
    r = subprocess.run(
        [str(script)],
        env={"PATH": "/usr/bin:/bin", "PRIVATE_LLM_NATIVE": "0"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "runs pure Python" in r.stderr
    assert not any(p.exists() for p in made)
    assert (pkg / "fast.py").exists()  # sources untouched


def test_the_build_has_what_the_type_check_needs() -> None:
    """mypyc type-checks the package before compiling it: an isolated build needs every runtime dependency."""
    import re
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[\[<>=~! ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    build = names(meta["build-system"]["requires"])
    assert names(meta["project"]["dependencies"]) <= build
    assert {"setuptools", "mypy"} <= build


def test_no_compiled_module_defines_a_class_read_through_its_annotations() -> None:
    """A compiled module keeps no real annotations (msgspec would see ``type`` for every field, pydantic the
    same): msgspec structs and pydantic models live in modules that are never compiled."""
    import ast

    for m in native.MODULES:
        tree = ast.parse(native.source_path(ROOT, m).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not bases & {"msgspec.Struct", "Struct", "BaseModel", "BaseSettings"}, (m, node.name)


def test_usage_is_read_by_the_struct_decoders() -> None:
    from gateway.proxy.shapes import USAGE_CHUNK, USAGE_ONLY

    answer = b'{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}'
    assert USAGE_ONLY.decode(answer).usage == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    chunk = USAGE_CHUNK.decode(answer)
    assert chunk.usage is not None and (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (7, 5)
