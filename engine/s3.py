"""An S3 client (the ``minio`` SDK) configured from the standard variables, and one-line error messages.

Variables read (the same ones the AWS CLI and most S3 tools read):

- ``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: e.g. ``http://minio:9000``. The scheme
  decides TLS (``https`` on, ``http`` off). Default: ``https://s3.amazonaws.com``.
- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optional ``AWS_SESSION_TOKEN`` (none: anonymous requests).
- ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
- ``AWS_CA_BUNDLE`` or ``SSL_CERT_FILE`` or ``REQUESTS_CA_BUNDLE``: CA certificates (PEM) that sign the endpoint's
  certificate. ``S3_VERIFY_SSL=false`` turns certificate checks off (never do that in production).

Nothing here imports torch or vllm: push/pull run in a slim init container.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.util import Retry, Timeout

DEFAULT_ENDPOINT = "https://s3.amazonaws.com"


class WeightsError(Exception):
    """A failure with a message fit for one line on stderr (no stack trace needed)."""


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

    @property
    def url(self) -> str:
        return ("https://" if self.secure else "http://") + self.endpoint


def _truthy(v: str) -> bool:
    return v.strip().lower() not in ("0", "false", "no", "off", "")


def config_from_env(env: Mapping[str, str] | None = None) -> S3Config:
    env = os.environ if env is None else env
    raw = env.get("S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or DEFAULT_ENDPOINT
    if "://" not in raw:
        raise WeightsError(f"S3 endpoint {raw!r} needs a scheme: http://host:port (no TLS) or https://host (TLS)")
    u = urlparse(raw)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise WeightsError(f"S3 endpoint {raw!r} is not an http(s)://host[:port] URL")
    if u.path not in ("", "/"):
        raise WeightsError(f"S3 endpoint {raw!r} must not have a path (the bucket goes in the s3:// URI)")
    access = env.get("AWS_ACCESS_KEY_ID") or None
    secret = env.get("AWS_SECRET_ACCESS_KEY") or None
    if access and not secret:
        raise WeightsError("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
    return S3Config(
        endpoint=u.netloc,
        secure=u.scheme == "https",
        access_key=access,
        secret_key=secret if access else None,
        session_token=(env.get("AWS_SESSION_TOKEN") or None) if access else None,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        ca_bundle=env.get("AWS_CA_BUNDLE") or env.get("SSL_CERT_FILE") or env.get("REQUESTS_CA_BUNDLE") or None,
        verify=_truthy(env.get("S3_VERIFY_SSL", "true")),
    )


def make_client(cfg: S3Config | None = None, *, max_connections: int = 10) -> Minio:
    """A minio client with bounded timeouts and a connection pool sized for ``max_connections`` threads."""
    cfg = cfg or config_from_env()
    # urllib3 logs each connection retry as a multi-line warning; our caller reports the failure in one line.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    pool_kw: dict = {
        "timeout": Timeout(connect=10, read=60),
        "maxsize": max(max_connections, 1) + 2,
        # Connection failures are retried a little; a mid-body failure is resumed by the caller (ranged GET).
        "retries": Retry(total=3, connect=2, read=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    }
    if cfg.secure:
        if cfg.verify:
            pool_kw["cert_reqs"] = "CERT_REQUIRED"
            if cfg.ca_bundle:
                if not os.path.isfile(cfg.ca_bundle):
                    raise WeightsError(f"CA bundle {cfg.ca_bundle} does not exist")
                pool_kw["ca_certs"] = cfg.ca_bundle
            else:
                pool_kw["ssl_context"] = ssl.create_default_context()
        else:
            pool_kw["cert_reqs"] = "CERT_NONE"
    return Minio(
        cfg.endpoint,
        access_key=cfg.access_key,
        secret_key=cfg.secret_key,
        session_token=cfg.session_token,
        secure=cfg.secure,
        region=cfg.region,
        http_client=urllib3.PoolManager(**pool_kw),
    )


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str  # without leading/trailing slash; may be ""

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_s3_uri(uri: str) -> S3Uri:
    if not uri.startswith("s3://"):
        raise WeightsError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise WeightsError(f"s3 URI has no bucket: {uri!r}")
    prefix = prefix.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise WeightsError(f"s3 URI has an empty or relative path segment: {uri!r}")
    return S3Uri(bucket, prefix)


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "AuthorizationHeaderMalformed", "InvalidSecurity"}


def _is_tls_error(e: BaseException) -> bool:
    return isinstance(e, urllib3.exceptions.SSLError) or isinstance(getattr(e, "reason", None), urllib3.exceptions.SSLError)


def is_unreachable(e: BaseException) -> bool:
    """Whether ``e`` means the S3 service could not be reached or did not answer (connection refused or reset,
    DNS, timeout, HTTP 5xx), as opposed to an answer (denied, no such key) or a TLS/configuration problem."""
    if isinstance(e, S3Error):
        return False
    if isinstance(e, ServerError):
        return e.status_code >= 500
    if _is_tls_error(e):
        return False
    return isinstance(e, (urllib3.exceptions.HTTPError, OSError))


def describe_error(e: BaseException, cfg: S3Config, what: str, bucket: str | None = None) -> str:
    """One line saying what went wrong with S3 while doing ``what`` (e.g. 'reading s3://b/p/x')."""
    if isinstance(e, S3Error):
        code = e.code or ""
        if code == "NoSuchBucket":
            return f"bucket {bucket or e.bucket_name!r} does not exist at {cfg.url} ({what})"
        if code in _CREDENTIAL_CODES:
            return (f"S3 at {cfg.url} rejected the credentials ({code}) while {what}: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY and the key's permissions")
        return f"S3 error {code or 'unknown'} while {what}: {e.message}"
    if isinstance(e, ServerError):
        return f"S3 at {cfg.url} answered HTTP {e.status_code} while {what}"
    if isinstance(e, InvalidResponseError):
        return f"S3 at {cfg.url} sent an invalid response while {what} (is this an S3 endpoint?)"
    if _is_tls_error(e):
        return (f"TLS handshake with {cfg.url} failed while {what}: {getattr(e, 'reason', e)} "
                "(set AWS_CA_BUNDLE to the CA that signed the endpoint's certificate)")
    if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
        return f"cannot reach S3 endpoint {cfg.url} while {what}: {type(getattr(e, 'reason', e) or e).__name__}"
    return f"{type(e).__name__} while {what}: {e}"
