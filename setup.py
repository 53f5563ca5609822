"""Builds the gateway's request path to C with mypyc (gateway/native.py says which modules and why).

Everything else about the package is in pyproject.toml. ``PRIVATE_LLM_NATIVE=0`` builds nothing (pure Python).
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _native_modules() -> tuple[list[str], str, str]:
    # gateway/native.py itself, without importing the package (its dependencies need not be installed yet).
    ns: dict = {"__name__": "gateway_native_build"}
    exec(compile((ROOT / "gateway" / "native.py").read_text(), "gateway/native.py", "exec"), ns)
    modules = list(ns["MODULES"])
    paths = [str(ns["source_path"](Path("."), m)) for m in modules]
    return paths, ns["source_digest"](ROOT, modules), ns["GROUP"]


# pip asks for the metadata first (egg_info/dist_info) and builds after: compile only for the build.
_METADATA_ONLY = {"egg_info", "dist_info"}.intersection(sys.argv) and not {
    "build_ext",
    "build",
    "bdist_wheel",
    "editable_wheel",
    "install",
    "develop",
}.intersection(sys.argv)

STAMP = ROOT / "gateway" / "_native_stamp.txt"
# An in-place build (scripts/build-native) replaces extensions that a running checkout imports: the stamp goes
# first and comes back only once every extension is built, so a half-done build is never taken for a fresh
# one. A wheel needs the stamp among its files before they are collected: written before the build.
INPLACE = "build_ext" in sys.argv and ("--inplace" in sys.argv or "-i" in sys.argv)

ext_modules = []
digest = ""
if _METADATA_ONLY:
    pass
elif os.environ.get("PRIVATE_LLM_NATIVE", "1") != "0":
    import shutil

    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) is None:
        raise SystemExit(
            f"setup.py: no C compiler ({cc}) to compile the gateway's request path: install one (gcc) and "
            "Python's headers (python3-dev), or set PRIVATE_LLM_NATIVE=0 to install it as pure Python"
        )
    from mypyc.build import mypycify

    paths, digest, group = _native_modules()
    STAMP.unlink(missing_ok=True)
    os.chdir(ROOT)
    ext_modules = mypycify(paths, opt_level="3", group_name=group)
    if not INPLACE:
        STAMP.write_text(digest + "\n")
else:
    STAMP.unlink(missing_ok=True)

setup(ext_modules=ext_modules)

if digest and INPLACE:
    STAMP.write_text(digest + "\n")
