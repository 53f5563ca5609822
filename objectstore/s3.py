"""S3 settings from the standard variables, a ``minio`` client built from them, and one-line error messages.

Variables (the ones the AWS CLI and SDKs read, plus three of ours):

- ``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: e.g. ``http://minio:9000``. The scheme
  decides TLS (``https`` on, ``http`` off). Default: ``https://s3.amazonaws.com``.
- ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
- ``AWS_CA_BUNDLE`` or ``SSL_CERT_FILE`` or ``REQUESTS_CA_BUNDLE``: CA certificates (PEM) that sign the endpoint's
  certificate (also used for STS and credential endpoints). ``S3_VERIFY_SSL=false`` turns certificate checks
  off (never in production).
- Credentials, chosen by ``S3_CREDENTIALS`` (default ``auto``: the first that is configured, in this order):

  ``static``        ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``)
  ``web-identity``  ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN`` (+ ``AWS_ROLE_SESSION_NAME``): STS
                    AssumeRoleWithWebIdentity (EKS IRSA, MinIO's STS); ``AWS_ENDPOINT_URL_STS`` for another STS
  ``container``     ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` or ``..._RELATIVE_URI`` (+ ``AWS_CONTAINER_AUTHORIZATION_TOKEN``
                    or ``..._TOKEN_FILE``): ECS task roles, EKS Pod Identity
  ``instance``      the EC2 instance metadata service (IMDSv2). Never chosen by ``auto``: off AWS it would
                    only add a timeout; set ``S3_CREDENTIALS=instance`` on EC2 nodes.
  ``anonymous``     unsigned requests (public buckets); what ``auto`` falls back to.

  Temporary credentials are refreshed before they expire (the ``minio`` providers do that).

Nothing here imports torch, vllm or the gateway: the weights init container and the gateway both use it.
"""

from __future__ import annotations

import logging
import os
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.credentials.providers import IamAwsProvider, Provider
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.util import Retry, Timeout

DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
CREDENTIAL_SOURCES = ("auto", "static", "web-identity", "container", "instance", "anonymous")


class S3ConfigError(ValueError):
    """A wrong or incomplete S3 setting; the message names the variable (one line)."""


class CredentialsError(Exception):
    """Temporary credentials could not be obtained (STS, container or instance endpoint)."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class S3Config:
    endpoint: str  # host[:port], as minio wants it
    secure: bool
    access_key: str | None
    secret_key: str | None
    session_token: str | None
    region: str | None
    ca_bundle: str | None
    verify: bool
    # static | web-identity | container | instance | anonymous (``auto`` is resolved by config_from_env)
    credentials: str = "anonymous"
    web_identity_token_file: str | None = None
    role_arn: str | None = None
    role_session_name: str | None = None
    sts_endpoint: str | None = None
    container_full_uri: str | None = None
    container_relative_uri: str | None = None

    @property
    def url(self) -> str:
        return ("https://" if self.secure else "http://") + self.endpoint


def _truthy(v: str) -> bool:
    return v.strip().lower() not in ("0", "false", "no", "off", "")


def _endpoint(raw: str, name: str) -> tuple[str, bool]:
    if "://" not in raw:
        raise S3ConfigError(f"{name} {raw!r} needs a scheme: http://host:port (no TLS) or https://host (TLS)")
    u = urlparse(raw)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise S3ConfigError(f"{name} {raw!r} is not an http(s)://host[:port] URL")
    if u.path not in ("", "/"):
        raise S3ConfigError(f"{name} {raw!r} must not have a path (the bucket goes in the s3:// URI)")
    return u.netloc, u.scheme == "https"


def config_from_env(env: Mapping[str, str] | None = None) -> S3Config:
    """The S3 settings from ``env`` (default: the process environment); raises S3ConfigError naming the variable."""
    env = os.environ if env is None else env

    def get(name: str) -> str | None:
        return (env.get(name) or "").strip() or None

    raw = get("S3_ENDPOINT_URL") or get("AWS_ENDPOINT_URL_S3") or get("AWS_ENDPOINT_URL") or DEFAULT_ENDPOINT
    endpoint, secure = _endpoint(raw, "S3 endpoint")
    access, secret = get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")
    if access and not secret:
        raise S3ConfigError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
    source = (get("S3_CREDENTIALS") or "auto").lower()
    if source not in CREDENTIAL_SOURCES:
        raise S3ConfigError(f"S3_CREDENTIALS must be one of {', '.join(CREDENTIAL_SOURCES)}, not {source!r}")
    token_file = get("AWS_WEB_IDENTITY_TOKEN_FILE")
    full_uri, rel_uri = (
        get("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
    )
    if source == "auto":
        source = (
            "static"
            if access
            else "web-identity"
            if token_file
            else "container"
            if full_uri or rel_uri
            else "anonymous"
        )
    if source == "static" and not access:
        raise S3ConfigError("S3_CREDENTIALS=static needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    role_arn = get("AWS_ROLE_ARN")
    if source == "web-identity" and not (token_file and role_arn):
        raise S3ConfigError(
            "web-identity credentials need AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN "
            f"(set: {', '.join(n for n, v in (('AWS_WEB_IDENTITY_TOKEN_FILE', token_file), ('AWS_ROLE_ARN', role_arn)) if v) or 'neither'})"
        )
    if source == "container" and not (full_uri or rel_uri):
        raise S3ConfigError(
            "container credentials need AWS_CONTAINER_CREDENTIALS_FULL_URI or "
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
        )
    sts = get("AWS_ENDPOINT_URL_STS")
    if sts:
        _endpoint(sts, "AWS_ENDPOINT_URL_STS")
    static = source == "static"
    return S3Config(
        endpoint=endpoint,
        secure=secure,
        access_key=access if static else None,
        secret_key=secret if static else None,
        session_token=get("AWS_SESSION_TOKEN") if static else None,
        region=get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
        ca_bundle=get("AWS_CA_BUNDLE") or get("SSL_CERT_FILE") or get("REQUESTS_CA_BUNDLE"),
        verify=_truthy(env.get("S3_VERIFY_SSL", "true")),
        credentials=source,
        web_identity_token_file=token_file if source == "web-identity" else None,
        role_arn=role_arn if source == "web-identity" else None,
        role_session_name=get("AWS_ROLE_SESSION_NAME") if source == "web-identity" else None,
        sts_endpoint=sts,
        container_full_uri=full_uri if source == "container" else None,
        container_relative_uri=rel_uri if source == "container" else None,
    )


def _pool_kwargs(cfg: S3Config, max_connections: int, tls: bool = True) -> dict[str, Any]:
    pool_kw: dict[str, Any] = {
        "timeout": Timeout(connect=10, read=60),
        "maxsize": max(max_connections, 1) + 2,
        # Connection failures are retried a little; a mid-body failure is resumed by the caller (ranged GET).
        "retries": Retry(
            total=3, connect=2, read=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    }
    if not tls:
        return pool_kw
    if cfg.verify:
        pool_kw["cert_reqs"] = "CERT_REQUIRED"
        if cfg.ca_bundle:
            if not os.path.isfile(cfg.ca_bundle):
                raise S3ConfigError(f"CA bundle {cfg.ca_bundle} does not exist")
            pool_kw["ca_certs"] = cfg.ca_bundle
        else:
            pool_kw["ssl_context"] = ssl.create_default_context()
    else:
        pool_kw["cert_reqs"] = "CERT_NONE"
    return pool_kw


class _ExplainedProvider(Provider):
    """A minio credentials provider whose failures become one-line CredentialsErrors."""

    def __init__(self, inner: Provider, cfg: S3Config) -> None:
        self.inner = inner
        self.cfg = cfg

    def _where(self) -> str:
        c = self.cfg
        if c.credentials == "web-identity":
            sts = c.sts_endpoint or (
                f"https://sts.{c.region}.amazonaws.com" if c.region else "https://sts.amazonaws.com"
            )
            return f"web identity (STS {sts}, role {c.role_arn}, token file {c.web_identity_token_file})"
        if c.credentials == "container":
            return f"the container credentials endpoint ({c.container_full_uri or 'http://169.254.170.2' + (c.container_relative_uri or '')})"
        return "the instance metadata service"

    def retrieve(self) -> Credentials:
        try:
            return self.inner.retrieve()
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
            raise CredentialsError(
                f"cannot reach {self._where()} for S3 credentials: "
                f"{type(getattr(e, 'reason', e) or e).__name__}",
                unreachable=True,
            ) from None
        except OSError as e:  # the token file
            raise CredentialsError(
                f"cannot read credentials for {self._where()}: {e.strerror or e}", unreachable=False
            ) from None
        except (ValueError, KeyError, TypeError, ET.ParseError) as e:
            raise CredentialsError(
                f"getting S3 credentials from {self._where()} failed: {e}", unreachable=False
            ) from None


def credentials_provider(cfg: S3Config) -> Provider | None:
    """The provider of temporary credentials for ``cfg`` (None for static keys or anonymous requests)."""
    if cfg.credentials not in ("web-identity", "container", "instance"):
        return None
    http = urllib3.PoolManager(**{k: v for k, v in _pool_kwargs(cfg, 2).items() if k != "maxsize"})
    if cfg.credentials == "web-identity":
        inner = IamAwsProvider(
            custom_endpoint=cfg.sts_endpoint,
            http_client=http,
            token_file=cfg.web_identity_token_file,
            role_arn=cfg.role_arn,
            role_session_name=cfg.role_session_name,
            region=cfg.region,
        )
    elif cfg.credentials == "container":
        # The authorization token (AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]) is read by the provider itself.
        inner = IamAwsProvider(
            http_client=http, full_uri=cfg.container_full_uri, relative_uri=cfg.container_relative_uri
        )
    else:
        inner = IamAwsProvider(http_client=http)
    return _ExplainedProvider(inner, cfg)


def make_client(cfg: S3Config | None = None, *, max_connections: int = 10) -> Minio:
    """A minio client with bounded timeouts and a connection pool sized for ``max_connections`` threads."""
    cfg = cfg or config_from_env()
    # urllib3 logs each connection retry as a multi-line warning; our caller reports the failure in one line.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    return Minio(
        cfg.endpoint,
        access_key=cfg.access_key,
        secret_key=cfg.secret_key,
        session_token=cfg.session_token,
        secure=cfg.secure,
        region=cfg.region,
        # TLS settings matter for an https endpoint, and for the credentials endpoints whatever the S3 scheme.
        http_client=urllib3.PoolManager(**_pool_kwargs(cfg, max_connections, tls=cfg.secure)),
        credentials=credentials_provider(cfg),
    )


def _is_tls_error(e: BaseException) -> bool:
    return isinstance(e, urllib3.exceptions.SSLError) or isinstance(
        getattr(e, "reason", None), urllib3.exceptions.SSLError
    )


def is_unreachable(e: BaseException) -> bool:
    """Whether ``e`` means S3 (or the credentials endpoint) could not be reached or did not answer: connection
    refused or reset, DNS, timeout, HTTP 5xx; not an answer (denied, no such key) nor a TLS or settings problem."""
    if isinstance(e, CredentialsError):
        return e.unreachable
    if isinstance(e, S3Error):
        return False
    if isinstance(e, ServerError):
        return e.status_code >= 500
    if _is_tls_error(e):
        return False
    return isinstance(e, (urllib3.exceptions.HTTPError, OSError))


_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
}
_CREDENTIAL_HINTS = {
    "static": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's permissions",
    "web-identity": "check AWS_ROLE_ARN and the role's permissions",
    "container": "check the task or pod role's permissions",
    "instance": "check the instance role's permissions",
    "anonymous": "no credentials were configured: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or S3_CREDENTIALS",
}


def describe_error(e: BaseException, cfg: S3Config, what: str, bucket: str | None = None) -> str:
    """One line saying what went wrong with S3 while doing ``what`` (e.g. 'reading s3://b/p/x')."""
    if isinstance(e, CredentialsError):
        return f"{e} (while {what})"
    if isinstance(e, S3Error):
        code = e.code or ""
        if code == "NoSuchBucket":
            return f"bucket {bucket or e.bucket_name!r} does not exist at {cfg.url} ({what})"
        if code in _CREDENTIAL_CODES:
            return (
                f"S3 at {cfg.url} rejected the credentials ({code}) while {what}: "
                f"{_CREDENTIAL_HINTS.get(cfg.credentials, _CREDENTIAL_HINTS['static'])}"
            )
        return f"S3 error {code or 'unknown'} while {what}: {e.message}"
    if isinstance(e, ServerError):
        return f"S3 at {cfg.url} answered HTTP {e.status_code} while {what}"
    if isinstance(e, InvalidResponseError):
        return f"S3 at {cfg.url} sent an invalid response while {what} (is this an S3 endpoint?)"
    if _is_tls_error(e):
        return (
            f"TLS handshake with {cfg.url} failed while {what}: {getattr(e, 'reason', e)} "
            "(set AWS_CA_BUNDLE to the CA that signed the endpoint's certificate)"
        )
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        return (
            f"cannot reach S3 endpoint {cfg.url} while {what}: {type(getattr(e, 'reason', e) or e).__name__}"
        )
    return f"{type(e).__name__} while {what}: {e}"
