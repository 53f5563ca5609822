"""``llm-engine lora add|remove|list``: LoRA adapters loaded into and unloaded from a running vLLM engine.

``add`` pulls an ``s3://`` adapter into the weight cache and verifies every file against its manifest (the same
pull as the base model's), checks that it is a PEFT LoRA adapter, then asks vLLM to load it
(``POST /v1/load_lora_adapter``). The engine must run with ``ENGINE_ALLOW_RUNTIME_LORA=true`` (vLLM's
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and LoRA enabled. Run it where the engine runs (its cache directory is
the one the engine reads), e.g. ``kubectl exec deploy/engine-x -- llm-engine lora add fin s3://models/fin``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class LoraError(Exception):
    pass


def _engine_url() -> str:
    host = os.environ.get("ENGINE_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get('ENGINE_PORT', '8000')}"


def _call(
    url: str,
    method: str,
    path: str,
    api_key: str | None,
    body: dict[str, Any] | None = None,
    timeout: float = 120,
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    if api_key:
        req.add_header("authorization", "Bearer " + api_key)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise LoraError(f"cannot reach the engine at {url}: {getattr(e, 'reason', e)}") from None


def _engine_message(data: bytes) -> str:
    try:
        obj = json.loads(data)
        if isinstance(obj, dict):
            err = obj.get("error")
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])
            if obj.get("detail"):
                return str(obj["detail"])
    except ValueError:
        pass
    return data[:300].decode("utf-8", "replace")


def check_adapter_dir(path: Path) -> None:
    """A PEFT LoRA adapter: adapter_config.json with peft_type LORA, and its weights."""
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoraError(f"{path} is not a LoRA adapter: adapter_config.json is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise LoraError(f"{cfg_path} is not valid JSON: {e}") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise LoraError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, expected LORA")
    if not any((path / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise LoraError(f"{path} is not a LoRA adapter: adapter_model.safetensors is missing")


def resolve_adapter(src: str, cache_dir: str, concurrency: int = 8) -> Path:
    """A local adapter directory: ``src`` itself, or the verified copy of an ``s3://`` adapter in the cache."""
    if src.startswith("s3://"):
        from engine.weights import WeightsError, pull

        try:
            path = Path(pull(src, cache_dir=os.path.expanduser(cache_dir), concurrency=concurrency))
        except WeightsError as e:
            raise LoraError(str(e)) from None
    else:
        path = Path(os.path.expanduser(src))
        if not path.is_dir():
            raise LoraError(f"adapter directory not found: {path}")
    check_adapter_dir(path)
    return path


def load(url: str, name: str, path: Path, api_key: str | None = None) -> None:
    status, data = _call(
        url, "POST", "/v1/load_lora_adapter", api_key, {"lora_name": name, "lora_path": str(path)}
    )
    if status == 404:
        raise LoraError(
            "the engine does not accept adapters at run time: start it with ENGINE_ALLOW_RUNTIME_LORA=true "
            "(and LoRA enabled)"
        )
    if status != 200:
        raise LoraError(f"the engine refused adapter {name!r} ({status}): {_engine_message(data)}")


def unload(url: str, name: str, api_key: str | None = None) -> None:
    status, data = _call(url, "POST", "/v1/unload_lora_adapter", api_key, {"lora_name": name})
    if status != 200:
        raise LoraError(f"the engine could not unload adapter {name!r} ({status}): {_engine_message(data)}")


def adapters(url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    """The adapters the engine serves now (its /v1/models entries that have a parent model)."""
    status, data = _call(url, "GET", "/v1/models", api_key, timeout=10)
    if status != 200:
        raise LoraError(f"the engine answered {status} to /v1/models: {_engine_message(data)}")
    return [m for m in json.loads(data).get("data", []) if m.get("parent")]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora", help="load/unload LoRA adapters in a running engine (ENGINE_ALLOW_RUNTIME_LORA=true)"
    )
    lsub = p.add_subparsers(dest="lora_cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help="the engine's base URL (default: http://$ENGINE_HOST:$ENGINE_PORT)"
    )
    a = lsub.add_parser(
        "add", parents=[common], help="pull and verify an adapter (s3:// or a directory), then load it"
    )
    a.add_argument("name", help="the model name clients (and the gateway) use for the adapter")
    a.add_argument("src", help="s3://bucket/prefix or a local directory (PEFT format)")
    a.add_argument("--cache-dir", default=os.environ.get("ENGINE_CACHE_DIR", "~/.cache/llm-engine"))
    a.set_defaults(func=_add)
    r = lsub.add_parser("remove", parents=[common], help="unload an adapter")
    r.add_argument("name")
    r.set_defaults(func=_remove)
    ls = lsub.add_parser("list", parents=[common], help="the adapters the engine serves now (JSON lines)")
    ls.set_defaults(func=_list)


def _run(fn) -> int:
    try:
        fn()
    except LoraError as e:
        print(f"llm-engine lora: {e}", file=sys.stderr)
        return 1
    return 0


def _add(args: argparse.Namespace) -> int:
    url, key = args.url or _engine_url(), os.environ.get("ENGINE_API_KEY") or None

    def go() -> None:
        path = resolve_adapter(args.src, args.cache_dir, int(os.environ.get("ENGINE_PULL_CONCURRENCY", "8")))
        load(url, args.name, path, key)
        print(f"loaded {args.name} from {path}")

    return _run(go)


def _remove(args: argparse.Namespace) -> int:
    url, key = args.url or _engine_url(), os.environ.get("ENGINE_API_KEY") or None

    def go() -> None:
        unload(url, args.name, key)
        print(f"unloaded {args.name}")

    return _run(go)


def _list(args: argparse.Namespace) -> int:
    url, key = args.url or _engine_url(), os.environ.get("ENGINE_API_KEY") or None

    def go() -> None:
        for m in adapters(url, key):
            print(json.dumps({"name": m.get("id"), "base": m.get("parent"), "path": m.get("root")}))

    return _run(go)
