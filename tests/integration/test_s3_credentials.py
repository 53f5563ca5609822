"""One S3 configuration for the engine's weights and the gateway's audit archive, against a real S3 server
(nanio): temporary credentials from a web identity (STS AssumeRoleWithWebIdentity) and from a container
credentials endpoint, session tokens on every request, a TLS endpoint signed by a private CA.

The STS and container credential endpoints are small HTTP servers started here that speak those protocols and
hand out the S3 server's real keys with a session token; what they received is recorded and checked.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.fixtures_weights import CountingProxy, run_engine_cli
from tests.integration.test_weights import MiB, assert_one_line_error, make_model, pull_json, push


class CredentialEndpoint:
    """An STS (AssumeRoleWithWebIdentity) or container credentials endpoint on 127.0.0.1."""

    def __init__(self, access_key: str, secret_key: str, session_token: str, status: int = 200) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests.append(
                    (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                )
                expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
                if status != 200:
                    body, ctype = b"<Error><Code>AccessDenied</Code></Error>", "application/xml"
                elif self.command == "POST":  # STS
                    body = (
                        '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                        "<AssumeRoleWithWebIdentityResult><Credentials>"
                        f"<AccessKeyId>{access_key}</AccessKeyId><SecretAccessKey>{secret_key}</SecretAccessKey>"
                        f"<SessionToken>{session_token}</SessionToken><Expiration>{expires}</Expiration>"
                        "</Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
                    ).encode()
                    ctype = "application/xml"
                else:  # container credentials
                    body = json.dumps(
                        {
                            "AccessKeyId": access_key,
                            "SecretAccessKey": secret_key,
                            "Token": session_token,
                            "Expiration": expires,
                        }
                    ).encode()
                    ctype = "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"c-{uuid.uuid4().hex[:12]}"
    s3_server.client().make_bucket(name)
    return name


def _no_static_keys(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def _signed_with_token(proxy: CountingProxy, token: str) -> list[str]:
    """Paths of the S3 requests that carried ``token`` as their session token (and signed it)."""
    out = []
    for _m, path, h in proxy.requests():
        if h.get("x-amz-security-token") == token and "x-amz-security-token" in h.get("authorization", ""):
            out.append(path)
    return out


def test_web_identity_credentials_for_push_and_pull(tmp_path, s3_server, bucket):
    token = f"session-{uuid.uuid4().hex}"
    sts = CredentialEndpoint(s3_server.access_key, s3_server.secret_key, token)
    proxy = CountingProxy(s3_server.port)
    try:
        jwt = tmp_path / "token"
        jwt.write_text("eyJ.projected-service-account-token.sig")
        env = {
            **_no_static_keys(s3_server.env()),
            "S3_ENDPOINT_URL": proxy.endpoint,
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(jwt),
            "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/llm-weights",
            "AWS_ROLE_SESSION_NAME": "engine-0",
            "AWS_ENDPOINT_URL_STS": sts.url,
        }
        model = make_model(tmp_path / "m", {"config.json": 100, "w.safetensors": MiB})
        push(model, f"s3://{bucket}/m", env)
        out = pull_json(f"s3://{bucket}/m", tmp_path / "cache", env)
        assert (Path(out["path"]) / "w.safetensors").read_bytes() == (model / "w.safetensors").read_bytes()

        # Each process asked STS once, with the projected token and the role.
        assert len(sts.requests) == 2
        for method, path, _h in sts.requests:
            q = parse_qs(urlparse(path).query)
            assert method == "POST" and q["Action"] == ["AssumeRoleWithWebIdentity"]
            assert q["WebIdentityToken"] == [jwt.read_text()]
            assert q["RoleArn"] == ["arn:aws:iam::123456789012:role/llm-weights"] and q[
                "RoleSessionName"
            ] == ["engine-0"]
        # Every S3 request was signed with the temporary credentials' session token.
        assert proxy.requests() and len(_signed_with_token(proxy, token)) == len(proxy.requests())

        # STS refusing is one line naming the role and the STS endpoint.
        denied = CredentialEndpoint("x", "y", "z", status=403)
        try:
            r = run_engine_cli(
                "pull",
                f"s3://{bucket}/m",
                "--cache-dir",
                str(tmp_path / "c2"),
                env={**env, "AWS_ENDPOINT_URL_STS": denied.url},
            )
            assert_one_line_error(r, "web identity", denied.url, "llm-weights", "403")
        finally:
            denied.close()
        # A web identity without its role is a settings error, named.
        r = run_engine_cli(
            "pull",
            f"s3://{bucket}/m",
            "--cache-dir",
            str(tmp_path / "c2"),
            env={k: v for k, v in env.items() if k != "AWS_ROLE_ARN"},
        )
        assert_one_line_error(r, "AWS_ROLE_ARN")
    finally:
        sts.close()
        proxy.close()


def test_container_credentials_and_an_unreachable_credentials_endpoint(tmp_path, s3_server, bucket):
    token = f"session-{uuid.uuid4().hex}"
    creds = CredentialEndpoint(s3_server.access_key, s3_server.secret_key, token)
    proxy = CountingProxy(s3_server.port)
    try:
        env = {
            **_no_static_keys(s3_server.env()),
            "S3_ENDPOINT_URL": proxy.endpoint,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": creds.url + "/v1/credentials",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "pod-identity-auth",
        }
        model = make_model(tmp_path / "m", {"config.json": 100})
        push(model, f"s3://{bucket}/m", env)
        cache = tmp_path / "cache"
        first = pull_json(f"s3://{bucket}/m", cache, env)
        assert [(m, p, h.get("authorization")) for m, p, h in creds.requests] == [
            ("GET", "/v1/credentials", "pod-identity-auth")
        ] * 2
        assert proxy.requests() and len(_signed_with_token(proxy, token)) == len(proxy.requests())

        # The credentials endpoint down counts as the source being unreachable: the verified copy is used.
        creds.close()
        out = pull_json(f"s3://{bucket}/m", cache, env)
        assert out["source_unreachable"] is True and out["path"] == first["path"]
        r = run_engine_cli("pull", f"s3://{bucket}/m", "--cache-dir", str(cache), "--require-source", env=env)
        assert_one_line_error(r, "container credentials endpoint", "--require-source")
    finally:
        proxy.close()


def test_audit_archive_reads_the_same_settings_tls_ca_bundle_and_session_token(
    tmp_path, s3_server, tls_ca, monkeypatch
):
    """The gateway's archive with the engine's variables: an https endpoint signed by a private CA
    (AWS_CA_BUNDLE) and temporary credentials (session token) from a container credentials endpoint."""
    from gateway.audit.archive import Archiver
    from gateway.audit.config import AuditSettings
    from gateway.audit.writer import AuditWriter
    from gateway.context import RequestContext

    ca_pem, server_ctx = tls_ca
    token = f"session-{uuid.uuid4().hex}"
    creds = CredentialEndpoint(s3_server.access_key, s3_server.secret_key, token)
    proxy = CountingProxy(s3_server.port, tls=server_ctx)
    try:
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
        ):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_REGION", s3_server.region)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca_pem))
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", creds.url + "/creds")
        bucket = f"audit-{uuid.uuid4().hex[:12]}"
        settings = AuditSettings(enabled=True, path=str(tmp_path / "audit.jsonl"), archive_bucket=bucket)

        async def write_and_archive() -> None:
            w = AuditWriter.from_settings(settings)
            await w.start()
            for i in range(3):
                c = RequestContext(f"req-{i}", "/v1/completions", "POST", "127.0.0.1")
                c.status, c.model, c.finished = 200, "tiny", time.perf_counter()
                await w.on_request_end(c)
            await w.stop()

        asyncio.run(write_and_archive())
        keys = [o.object_name for o in s3_server.client().list_objects(bucket, recursive=True)]
        assert len(keys) == 1 and keys[0].startswith("audit/")
        assert not list(tmp_path.glob("audit.*.jsonl"))  # archived, verified, removed locally
        assert proxy.requests() and len(_signed_with_token(proxy, token)) == len(proxy.requests())

        # Without the CA bundle the TLS endpoint is refused (the archive verifies certificates like the engine).
        monkeypatch.delenv("AWS_CA_BUNDLE")
        a = Archiver.from_env(settings)
        seg = tmp_path / "audit.x.jsonl"
        seg.write_text("{}\n")
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            a.archive(str(seg))
        assert seg.exists()
    finally:
        creds.close()
        proxy.close()


def test_gateway_refuses_to_start_with_wrong_archive_s3_settings(tmp_path):
    """A wrong S3 setting for the audit archive stops `llm-gateway serve` with one line naming the variable."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import gateway_config
    from tests.support import REPO

    cfg = gateway_config(
        ["http://127.0.0.1:9"],
        audit={"enabled": True, "path": str(tmp_path / "audit.jsonl"), "archive_bucket": "audit"},
    )
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "GATEWAY_"))}
    env.update(PYTHONPATH=str(REPO), S3_ENDPOINT_URL="http://127.0.0.1:9", AWS_WEB_IDENTITY_TOKEN_FILE="/t")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "gw.yaml"), "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip().splitlines()[-1].startswith("llm-gateway: invalid S3 settings for the audit archive")
    )
    assert "AWS_ROLE_ARN" in r.stderr
