"""``llm-gateway``: serve the gateway; manage API keys."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.app import create_app
    from gateway.drain import serve
    from gateway.settings import GatewaySettings

    init = {}
    if args.config:
        init["config_file"] = args.config
    try:
        settings = GatewaySettings(**init)
    except Exception as e:  # a clear one-line error for a bad config
        print(f"llm-gateway: invalid configuration: {e}", file=sys.stderr)
        return 2
    if settings.audit.enabled and settings.audit.archive_bucket:
        from objectstore import S3ConfigError, config_from_env

        try:
            config_from_env()
        except S3ConfigError as e:
            print(f"llm-gateway: invalid S3 settings for the audit archive: {e}", file=sys.stderr)
            return 2
    if args.host:
        settings.host = args.host
    if args.port is not None:
        settings.port = args.port
    logs.configure(settings.log_level)
    if args.workers is not None:
        settings.workers = args.workers
    common = dict(
        host=settings.host,
        port=settings.port,
        loop="auto",
        http="auto",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout),
        backlog=4096,
    )
    if settings.workers > 1:
        # Each worker re-reads the settings from the environment (config file path included).
        import os

        import uvicorn

        if args.config:
            os.environ["GATEWAY_CONFIG"] = args.config
        os.environ["GATEWAY_HOST"], os.environ["GATEWAY_PORT"] = settings.host, str(settings.port)
        # Several worker processes: uvicorn's supervisor forwards SIGTERM and each worker shuts down
        # gracefully (in-flight requests finish within drain_timeout); /readyz does not flip first.
        uvicorn.run("gateway.app:create_app_from_env", factory=True, workers=settings.workers, **common)
        return 0
    app = create_app(settings)
    # Graceful drain on SIGTERM: /readyz turns 503, in-flight streams finish (gateway/drain.py).
    serve(app, settings.host, settings.port, settings.drain_timeout)
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    import yaml

    from gateway.auth.apikeys import digest, new_key

    key = new_key()
    entry = {"id": args.id, "sha256": digest(key), "tenant": args.tenant, "models": args.models.split(",")}
    if args.subject:
        entry["subject"] = args.subject
    print(key)
    print("# store this under api_keys: in the gateway config (the key itself is not stored anywhere):", file=sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False).rstrip(), file=sys.stderr if args.quiet else sys.stdout)
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    from gateway.auth.apikeys import digest

    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    print(digest(key))
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit.chain import main_verify

    return main_verify(args.paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llm-gateway", description="OpenAI-compatible gateway in front of vLLM engines")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="YAML config file (or GATEWAY_CONFIG)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int, help="worker processes (GATEWAY_WORKERS)")
    s.set_defaults(func=_serve)
    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="print a new API key once, and the config entry that stores its digest")
    kc.add_argument("--id", required=True, help="key id (safe to log)")
    kc.add_argument("--tenant", default="default")
    kc.add_argument("--subject")
    kc.add_argument("--models", default="*", help="comma-separated model names, * for all")
    kc.add_argument("--quiet", action="store_true", help="print only the key on stdout")
    kc.set_defaults(func=_keys_create)
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
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
