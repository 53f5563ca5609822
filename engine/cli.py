"""``llm-engine``: run a model replica (pull → verify → vLLM), push/pull weights, make a test model."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.settings import EngineSettings


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ENGINE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _resolve_model(uri: str, s: EngineSettings) -> str:
    if uri.startswith("s3://"):
        from engine.phases import PHASES
        from engine.weights import WeightsError, pull

        PHASES.enter(f"pulling {uri}", "(verified, resumable; cached files are checked, not downloaded)")

        try:
            return str(
                pull(
                    uri,
                    cache_dir=os.path.expanduser(s.cache_dir),
                    concurrency=s.pull_concurrency,
                    verify_cache=s.verify_cache,
                    require_source=s.require_source,
                )
            )
        except WeightsError as e:
            raise SystemExit(f"llm-engine: error: {e}") from None
    path = os.path.expanduser(uri)
    if not os.path.isdir(path):
        raise SystemExit(f"llm-engine: model directory not found: {path}")
    return path


def _run(args: argparse.Namespace) -> int:
    from configkit import ConfigError
    from engine.settings import load_engine_settings
    from engine.supervisor import Supervisor, detect_device
    from engine.vllm_args import EngineArgsError, build_vllm_command, vllm_environment

    overrides = {
        k: v for k, v in {"model": args.model, "port": args.port, "host": args.host}.items() if v is not None
    }
    try:
        s = load_engine_settings(**overrides)
    except ConfigError as e:
        print(f"llm-engine: invalid settings: {e}", file=sys.stderr)
        return 2
    device = detect_device() if s.device == "auto" else s.device
    from engine.group import GroupError, resolve_plan

    try:
        plan = resolve_plan(s, os.environ)
    except GroupError as e:
        print(f"llm-engine: {e}", file=sys.stderr)
        return 2
    exporter = None
    if not args.dry_run:
        from engine.metrics import start_exporter

        # Started before the pull so pull metrics are visible while it runs.
        exporter = start_exporter(s.metrics_port, s.host)
    model_dir = _resolve_model(s.model, s)
    loras = {}
    if s.lora_modules:
        for item in s.lora_modules.split(","):
            name, _, src = item.strip().partition("=")
            if not name or not src:
                print(
                    f"llm-engine: ENGINE_LORA_MODULES entries are name=path-or-s3-uri, got {item!r}",
                    file=sys.stderr,
                )
                return 2
            loras[name] = _resolve_model(src, s)
    if not s.served_model_name and s.model.startswith("s3://"):
        s.served_model_name = s.model.rstrip("/").rsplit("/", 1)[-1]
    try:
        cmd = build_vllm_command(
            s, model_dir, device=device, python=s.python or sys.executable, lora_dirs=loras, plan=plan
        )
    except EngineArgsError as e:
        print(f"llm-engine: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from engine.group_run import commands

        for c in commands(s, plan, cmd, s.python or sys.executable):
            print(shlex.join(c))
        return 0
    env = vllm_environment(device, os.environ, s.api_key, s)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    if plan.is_group:
        from engine.group_run import run_group

        try:
            return run_group(s, plan, cmd, env, model_dir, f"http://{host}:{s.port}/health")
        finally:
            if exporter is not None:
                exporter.shutdown()
    sup = Supervisor(cmd, env, f"http://{host}:{s.port}/health", s.startup_timeout, s.drain_timeout)
    try:
        return sup.run()
    finally:
        if exporter is not None:
            exporter.shutdown()


def _settings_help() -> str:
    from configkit import render_reference, settings_reference
    from engine.settings import EngineSettings

    rows = settings_reference(EngineSettings, "ENGINE_", None)
    return "settings: environment variable [type] default, meaning.\n" + render_reference(rows, yaml=False)


def _config_check(args: argparse.Namespace) -> int:
    from configkit import ConfigError, effective, env_origins, render_effective
    from engine.settings import EngineSettings, load_engine_settings

    overrides = {"model": args.model} if args.model else {}
    try:
        s = load_engine_settings(**overrides)
    except ConfigError as e:
        print(f"llm-engine: invalid settings: {e}", file=sys.stderr)
        return 1
    if args.quiet:
        return 0
    rows = effective(s, None, "", env_origins(EngineSettings, os.environ, "ENGINE_", None), init=overrides)
    print("# ENGINE_* settings: valid. Effective configuration (secrets masked), origin of each value:")
    print(render_effective(rows))
    return 0


def _make_test_model(args: argparse.Namespace) -> int:
    from engine.testmodel import build_embedding_model, build_lora_adapter, build_test_model

    if args.kind == "embed":
        out = build_embedding_model(args.out, seed=args.seed)
    elif args.kind == "lora":
        if not args.base:
            print("llm-engine make-test-model: --kind lora needs --base DIR (the generator)", file=sys.stderr)
            return 2
        out = build_lora_adapter(args.base, args.out, seed=args.seed)
    else:
        out = build_test_model(args.out, seed=args.seed, shape=args.shape, weights=not args.no_weights)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    from engine import __version__

    p = argparse.ArgumentParser(prog="llm-engine", description="one model replica: pull verified weights, run vLLM")
    p.add_argument("--version", action="version", version=f"llm-engine {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "run",
        help="pull (if s3://), verify, then run and supervise vLLM (settings: ENGINE_*)",
        description="Pull (if s3://) and verify the weights, then run and supervise vLLM. Settings: ENGINE_* variables.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--model", help="overrides ENGINE_MODEL")
    r.add_argument("--host", help="overrides ENGINE_HOST")
    r.add_argument("--port", type=int, help="overrides ENGINE_PORT")
    r.add_argument("--dry-run", action="store_true", help="print vLLM's command line and exit")
    r.set_defaults(func=_run)
    c = sub.add_parser("config", help="check the ENGINE_* settings without starting")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    cc = csub.add_parser(
        "check",
        help="validate the ENGINE_* variables; print the effective settings and where each value came from",
        description="Validate without starting: exit 0 and print every effective value (secrets masked) with "
        "its origin (env, default), or exit 1 with one line naming the culprit.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cc.add_argument("--model", help="overrides ENGINE_MODEL")
    cc.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")
    cc.set_defaults(func=_config_check)
    m = sub.add_parser("make-test-model", help="build a small random-weight Llama model offline")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shape", default="tiny", choices=["tiny", "small", "1b", "7b"])
    m.add_argument(
        "--no-weights", action="store_true", help="config + tokenizer only (for --load-format dummy)"
    )
    m.add_argument(
        "--kind",
        default="generate",
        choices=["generate", "embed", "lora"],
        help="generate: a Llama generator; embed: a BERT embedding model (embeddings, score, rerank); "
        "lora: a PEFT LoRA adapter for the generator given with --base",
    )
    m.add_argument("--base", help="with --kind lora: the generator's directory (built by this command)")
    m.set_defaults(func=_make_test_model)
    try:
        from engine import weights_cli

        weights_cli.register(sub)
    except ImportError:
        pass
    from engine import lora

    lora.register(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
