"""S3 settings from the standard variables, s3:// URIs, and one-line error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from minio.error import S3Error

from engine.s3 import WeightsError, config_from_env, describe_error, make_client, parse_s3_uri
from tests.support import REPO


def test_endpoint_scheme_decides_tls_and_precedence():
    c = config_from_env({"S3_ENDPOINT_URL": "http://minio:9000", "AWS_ENDPOINT_URL": "https://other"})
    assert (c.endpoint, c.secure, c.url) == ("minio:9000", False, "http://minio:9000")
    c = config_from_env({"AWS_ENDPOINT_URL": "https://s3.example.com"})
    assert (c.endpoint, c.secure) == ("s3.example.com", True)
    c = config_from_env({"AWS_ENDPOINT_URL_S3": "http://a:1", "AWS_ENDPOINT_URL": "http://b:2"})
    assert c.endpoint == "a:1"
    c = config_from_env({})
    assert (c.endpoint, c.secure, c.access_key) == ("s3.amazonaws.com", True, None)


def test_credentials_region_and_ca_bundle():
    env = {"S3_ENDPOINT_URL": "https://s3.local", "AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk",
           "AWS_SESSION_TOKEN": "tok", "AWS_DEFAULT_REGION": "eu-west-1", "SSL_CERT_FILE": "/b.pem"}
    c = config_from_env(env)
    assert (c.access_key, c.secret_key, c.session_token, c.region, c.ca_bundle) == ("ak", "sk", "tok", "eu-west-1", "/b.pem")
    assert config_from_env({**env, "AWS_REGION": "us-east-2"}).region == "us-east-2"
    assert config_from_env({**env, "AWS_CA_BUNDLE": "/a.pem"}).ca_bundle == "/a.pem"
    assert config_from_env({**env, "S3_VERIFY_SSL": "false"}).verify is False
    assert config_from_env(env).verify is True


@pytest.mark.parametrize(
    "env, message",
    [
        ({"S3_ENDPOINT_URL": "minio:9000"}, "needs a scheme"),
        ({"S3_ENDPOINT_URL": "ftp://minio"}, "not an http"),
        ({"S3_ENDPOINT_URL": "http://minio:9000/bucket"}, "must not have a path"),
        ({"AWS_ACCESS_KEY_ID": "ak"}, "AWS_SECRET_ACCESS_KEY is not"),
    ],
)
def test_bad_settings(env, message):
    with pytest.raises(WeightsError, match=message):
        config_from_env(env)


def test_tls_client_uses_the_ca_bundle(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not checked until a connection is made")
    client = make_client(config_from_env({"S3_ENDPOINT_URL": "https://s3.local", "AWS_CA_BUNDLE": str(bundle)}))
    kw = client._http.connection_pool_kw
    assert kw["ca_certs"] == str(bundle) and kw["cert_reqs"] == "CERT_REQUIRED"
    with pytest.raises(WeightsError, match="does not exist"):
        make_client(config_from_env({"S3_ENDPOINT_URL": "https://s3.local", "AWS_CA_BUNDLE": str(tmp_path / "x")}))
    plain = make_client(config_from_env({"S3_ENDPOINT_URL": "http://s3.local"}))
    assert "ca_certs" not in plain._http.connection_pool_kw


@pytest.mark.parametrize(
    "uri, bucket, prefix",
    [("s3://b/p", "b", "p"), ("s3://models/org/llama/", "models", "org/llama"), ("s3://b", "b", "")],
)
def test_parse_s3_uri(uri, bucket, prefix):
    u = parse_s3_uri(uri)
    assert (u.bucket, u.prefix) == (bucket, prefix)
    assert u.key("config.json") == (f"{prefix}/config.json" if prefix else "config.json")


@pytest.mark.parametrize("uri", ["http://b/p", "s3://", "s3:///p", "s3://b/a/../c", "s3://b/a//c"])
def test_bad_s3_uris(uri):
    with pytest.raises(WeightsError):
        parse_s3_uri(uri)


def _s3_error(code: str) -> S3Error:
    return S3Error(None, code, "msg", "/b/k", "rid", "hid", bucket_name="b")


def test_error_messages_are_one_line_and_name_the_cause():
    cfg = config_from_env({"S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert "bucket 'models' does not exist" in describe_error(_s3_error("NoSuchBucket"), cfg, "x", "models")
    for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"):
        m = describe_error(_s3_error(code), cfg, "reading")
        assert "rejected the credentials" in m and code in m and "\n" not in m
    assert "cannot reach S3 endpoint http://127.0.0.1:9" in describe_error(ConnectionRefusedError(), cfg, "x")


def test_push_pull_modules_import_neither_torch_nor_vllm():
    code = ("import sys, engine.weights, engine.weights_cli, engine.s3, engine.manifest, engine.cli, objectstore\n"
            "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_credential_source_auto_picks_the_first_configured():
    base = {"S3_ENDPOINT_URL": "https://s3.local"}
    irsa = {"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token", "AWS_ROLE_ARN": "arn:aws:iam::1:role/r"}
    pod = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"}
    keys = {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk", "AWS_SESSION_TOKEN": "tok"}
    assert config_from_env(base).credentials == "anonymous"
    assert config_from_env({**base, **pod}).credentials == "container"
    c = config_from_env({**base, **pod, **irsa, "AWS_ENDPOINT_URL_STS": "https://sts.local"})
    assert (c.credentials, c.role_arn, c.web_identity_token_file, c.sts_endpoint) == \
        ("web-identity", "arn:aws:iam::1:role/r", "/var/run/secrets/token", "https://sts.local")
    c = config_from_env({**base, **pod, **irsa, **keys})
    assert (c.credentials, c.access_key, c.session_token) == ("static", "ak", "tok")
    # An explicit source wins over auto's order; keys are not sent with temporary credentials.
    c = config_from_env({**base, **keys, **irsa, "S3_CREDENTIALS": "web-identity"})
    assert (c.credentials, c.access_key, c.secret_key) == ("web-identity", None, None)
    assert config_from_env({**base, "S3_CREDENTIALS": "instance"}).credentials == "instance"
    assert config_from_env({**base, **keys, "S3_CREDENTIALS": "anonymous"}).access_key is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"S3_CREDENTIALS": "magic"}, "S3_CREDENTIALS must be one of auto, static"),
        ({"S3_CREDENTIALS": "static"}, "needs AWS_ACCESS_KEY_ID"),
        ({"AWS_WEB_IDENTITY_TOKEN_FILE": "/t"}, "AWS_ROLE_ARN"),
        ({"S3_CREDENTIALS": "web-identity", "AWS_ROLE_ARN": "arn"}, "AWS_WEB_IDENTITY_TOKEN_FILE"),
        ({"S3_CREDENTIALS": "container"}, "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        ({"AWS_WEB_IDENTITY_TOKEN_FILE": "/t", "AWS_ROLE_ARN": "a", "AWS_ENDPOINT_URL_STS": "sts.local"},
         "AWS_ENDPOINT_URL_STS"),
    ],
)
def test_bad_credential_settings_name_the_variable(env, message):
    with pytest.raises(WeightsError, match=message):
        config_from_env(env)


def test_temporary_credentials_get_a_provider_with_the_same_tls_settings(tmp_path):
    from objectstore.s3 import credentials_provider

    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    env = {"S3_ENDPOINT_URL": "http://minio:9000", "AWS_WEB_IDENTITY_TOKEN_FILE": "/t", "AWS_ROLE_ARN": "arn",
           "AWS_CA_BUNDLE": str(bundle)}
    provider = credentials_provider(config_from_env(env))
    # The STS call verifies TLS with the same CA bundle even though the S3 endpoint itself is plain http.
    assert provider.inner._http_client.connection_pool_kw["ca_certs"] == str(bundle)
    assert credentials_provider(config_from_env({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})) is None
    assert type(make_client(config_from_env(env))._provider).__name__ == "_ExplainedProvider"
    assert make_client(config_from_env({"S3_ENDPOINT_URL": "http://minio:9000"}))._provider is None  # anonymous


def test_unreachable_means_no_answer_not_a_refusal():
    import urllib3
    from minio.error import ServerError

    from objectstore import CredentialsError, is_unreachable

    assert is_unreachable(ConnectionRefusedError())
    assert is_unreachable(urllib3.exceptions.MaxRetryError(None, "/", urllib3.exceptions.NewConnectionError(None, "x")))
    assert is_unreachable(ServerError("503", 503))
    assert is_unreachable(CredentialsError("sts down", unreachable=True))
    assert not is_unreachable(CredentialsError("denied", unreachable=False))
    assert not is_unreachable(_s3_error("AccessDenied"))
    assert not is_unreachable(urllib3.exceptions.MaxRetryError(None, "/", urllib3.exceptions.SSLError("bad cert")))
    assert not is_unreachable(ValueError("x"))


def test_gateway_and_engine_share_only_objectstore():
    """gateway/ and engine/ never import each other; objectstore/ and configkit/ (used by both) import neither."""
    import ast

    def imported(pkg: str) -> set[str]:
        out = set()
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    out.add(node.module.split(".")[0])
        return out

    assert "engine" not in imported("gateway") and "gateway" not in imported("engine")
    assert not imported("objectstore") & {"engine", "gateway", "torch", "vllm", "starlette"}
    assert not imported("configkit") & {"engine", "gateway", "objectstore", "torch", "vllm", "starlette"}
    assert "objectstore" in imported("gateway") and "objectstore" in imported("engine")
