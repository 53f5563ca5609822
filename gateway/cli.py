"""``llm-gateway``: serve the gateway, check its configuration, manage API keys, verify audit logs."""

from __future__ import annotations

import argparse
import os
import sys

from gateway import __version__


def _settings_help() -> str:
    from configkit import render_reference, settings_reference
    from gateway.settings import _NOT_IN_YAML, GatewaySettings

    rows = settings_reference(GatewaySettings, "GATEWAY_", "__", skip=_NOT_IN_YAML)
    return (
        "settings: environment variable [type] default, YAML key in the GATEWAY_CONFIG file, meaning.\n"
        "Variables win over the file; (YAML) rows exist only in the file (items of lists and maps).\n"
        "  GATEWAY_CONFIG  [str]  default: unset\n      YAML file with the structured settings (or --config).\n"
        + render_reference(rows)
    )


def _serve(args: argparse.Namespace) -> int:
    from configkit import ConfigError
    from gateway import logs
    from gateway.app import check_workers
    from gateway.serve import serve
    from gateway.settings import load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as e:  # one line naming the key and where it came from
        print(f"llm-gateway: invalid configuration: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "workers": args.workers}.items() if v is not None}
    if overrides:
        settings = settings.model_copy(update=overrides)
    if settings.audit.enabled and settings.audit.archive_bucket:
        from objectstore import S3ConfigError, config_from_env

        try:
            config_from_env()
        except S3ConfigError as e:
            print(f"llm-gateway: invalid S3 settings for the audit archive: {e}", file=sys.stderr)
            return 2
    problem = check_workers(settings)
    if problem:
        print(f"llm-gateway: {problem}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if settings.workers > 1:
        # Each worker re-reads the settings from the environment: hand it what the command line said.
        if args.config:
            os.environ["GATEWAY_CONFIG"] = args.config
        os.environ["GATEWAY_HOST"], os.environ["GATEWAY_PORT"] = settings.host, str(settings.port)
        os.environ["GATEWAY_WORKERS"] = str(settings.workers)
    # Graceful drain on SIGTERM, with one worker or several: /readyz turns 503, in-flight streams finish.
    return serve(settings)


def _config_check(args: argparse.Namespace) -> int:
    from configkit import ConfigError, effective, env_origins, register_aliases, render_effective
    from gateway.auth.apikeys import read_key_file
    from gateway.quota.config import Limits, ScopeLimits
    from gateway.settings import GatewaySettings, load_settings, read_config_file

    path = args.file or os.environ.get("GATEWAY_CONFIG")
    try:
        data = read_config_file(path) if path else {}
        settings = load_settings(path)
        if settings.api_keys_file:
            try:
                read_key_file(settings.api_keys_file)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"{settings.api_keys_file} (api_keys_file): {' '.join(str(e).split())}"
                ) from None
    except ConfigError as e:
        print(f"llm-gateway: invalid configuration: {e}", file=sys.stderr)
        return 1
    if args.quiet:
        return 0
    register_aliases(Limits, ScopeLimits)
    env = env_origins(GatewaySettings, os.environ, "GATEWAY_", "__")
    rows = effective(settings, data, path or "", env)
    rows = [r for r in rows if r[0] != "config_file"]
    print(
        f"# {path or 'no config file'}: valid. Effective configuration (secrets masked), origin of each value:"
    )
    print(render_effective(rows))
    return 0


# --------------------------------------------------------------------------------------------- keys


def _key_file(args: argparse.Namespace, required: bool = True) -> str | None:
    path = args.file or os.environ.get("GATEWAY_API_KEYS_FILE")
    if required and not path:
        raise SystemExit("llm-gateway: no key file: pass --file FILE or set GATEWAY_API_KEYS_FILE")
    return path


def _keys_create(args: argparse.Namespace) -> int:
    import yaml

    from gateway.auth.apikeys import digest, new_key
    from gateway.auth.keyfile import KeyFileError, add_entry

    key = new_key()
    entry = {"id": args.id, "sha256": digest(key), "tenant": args.tenant, "models": args.models.split(",")}
    if args.subject:
        entry["subject"] = args.subject
    path = _key_file(args, required=False)
    if path:
        try:
            add_entry(path, entry)
        except KeyFileError as e:
            print(f"llm-gateway: {e}", file=sys.stderr)
            return 1
        print(key)
        print(f"llm-gateway: added key '{args.id}' to {path} (only its digest is stored)", file=sys.stderr)
        return 0
    print(key)
    if not args.quiet:
        print("# store this under api_keys: in the gateway config (the key itself is not stored anywhere):")
        print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from gateway.auth.keyfile import KeyFileError, load_entries

    try:
        entries, _ = load_entries(_key_file(args) or "")
    except KeyFileError as e:
        print(f"llm-gateway: {e}", file=sys.stderr)
        return 1
    rows = [("ID", "TENANT", "SUBJECT", "MODELS", "STATE", "SHA256")]
    for entry in entries:
        rows.append(
            (
                str(entry.get("id")),
                str(entry.get("tenant", "default")),
                str(entry.get("subject") or "-"),
                ",".join(entry.get("models", ["*"])),
                "revoked" if entry.get("disabled") else "active",
                str(entry.get("sha256", ""))[:12] + "…",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from gateway.auth.keyfile import KeyFileError, update_entry

    try:
        update_entry(_key_file(args) or "", args.id, {"disabled": True})
    except KeyFileError as e:
        print(f"llm-gateway: {e}", file=sys.stderr)
        return 1
    print(
        f"llm-gateway: revoked key '{args.id}' (a running gateway picks this up within keys_file_poll_interval)",
        file=sys.stderr,
    )
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    from gateway.auth.apikeys import digest, new_key
    from gateway.auth.keyfile import KeyFileError, update_entry

    key = new_key()
    try:
        update_entry(_key_file(args) or "", args.id, {"sha256": digest(key), "disabled": False})
    except KeyFileError as e:
        print(f"llm-gateway: {e}", file=sys.stderr)
        return 1
    print(key)
    print(
        f"llm-gateway: rotated key '{args.id}': the old key stops working at the gateway's next reload",
        file=sys.stderr,
    )
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    from gateway.auth.apikeys import digest

    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    print(digest(key))
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit.chain import main_verify

    return main_verify(args.paths)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-gateway", description="OpenAI-compatible gateway in front of vLLM engines"
    )
    p.add_argument("--version", action="version", version=f"llm-gateway {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Settings come from GATEWAY_* variables and the YAML file (--config).",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", help="YAML config file (or GATEWAY_CONFIG)")
    s.add_argument("--host", help="overrides GATEWAY_HOST")
    s.add_argument("--port", type=int, help="overrides GATEWAY_PORT")
    s.add_argument("--workers", type=int, help="worker processes (GATEWAY_WORKERS)")
    s.set_defaults(func=_serve)

    c = sub.add_parser("config", help="check the configuration without starting")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    cc = csub.add_parser(
        "check",
        help="validate FILE (default GATEWAY_CONFIG) and the GATEWAY_* variables; print the effective configuration",
        description="Validate without starting: exit 0 and print every effective value (secrets masked) with "
        "its origin (file, env, default), or exit 1 with one line naming the culprit.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cc.add_argument("file", nargs="?", help="YAML config file (default: GATEWAY_CONFIG)")
    cc.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")
    cc.set_defaults(func=_config_check)

    k = sub.add_parser("keys", help="manage API keys in the key file (GATEWAY_API_KEYS_FILE)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    file_help = (
        "the key file (default: GATEWAY_API_KEYS_FILE); changed atomically, previous version kept as FILE.bak"
    )
    kc = ksub.add_parser(
        "create",
        help="make a new key: print it once on stdout, store only its digest in the key file",
        description="Make a new API key. With a key file (--file or GATEWAY_API_KEYS_FILE) its digest entry is "
        "added to the file and only the key is printed (stdout); without one, the key and the entry to paste "
        "under api_keys: are printed.",
    )
    kc.add_argument("--id", required=True, help="key id (safe to log)")
    kc.add_argument("--tenant", default="default")
    kc.add_argument("--subject")
    kc.add_argument("--models", default="*", help="comma-separated model names, * for all")
    kc.add_argument("--file", help=file_help)
    kc.add_argument("--quiet", action="store_true", help="without a key file: print only the key")
    kc.set_defaults(func=_keys_create)
    kl = ksub.add_parser(
        "list", help="list the keys in the key file (ids, tenants, models, state; never keys)"
    )
    kl.add_argument("--file", help=file_help)
    kl.set_defaults(func=_keys_list)
    kr = ksub.add_parser("revoke", help="disable a key (its entry stays, marked disabled)")
    kr.add_argument("id")
    kr.add_argument("--file", help=file_help)
    kr.set_defaults(func=_keys_revoke)
    kt = ksub.add_parser("rotate", help="give a key id a new key: print it once, replace the stored digest")
    kt.add_argument("id")
    kt.add_argument("--file", help=file_help)
    kt.set_defaults(func=_keys_rotate)
    kh = ksub.add_parser("hash", help="print the sha256 digest of a key ('-' reads it from stdin)")
    kh.add_argument("key")
    kh.set_defaults(func=_keys_hash)

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    av = asub.add_parser(
        "verify",
        help="check audit segments' hash chains; reports edited, reordered, inserted and deleted records "
        "(exit status 1 if any)",
    )
    av.add_argument("paths", nargs="+", help="segment files or directories (all *.jsonl in them)")
    av.set_defaults(func=_audit_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
