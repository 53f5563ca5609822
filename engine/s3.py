"""S3 for the engine: ``s3://`` URIs, and the shared S3 settings and client (``objectstore``) with errors as
:class:`WeightsError`.

The variables (endpoint, region, credentials: static keys, web identity, container or instance credentials,
CA bundle, verify flag) are documented in ``objectstore/s3.py`` and docs/weights.md; the gateway's audit archive
reads the same ones.

Nothing here imports torch or vllm: push/pull run in a slim init container.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from minio import Minio

from objectstore import S3Config, S3ConfigError, describe_error, is_unreachable
from objectstore import config_from_env as _config_from_env
from objectstore import make_client as _make_client

__all__ = ["S3Config", "S3Uri", "WeightsError", "config_from_env", "describe_error", "is_unreachable", "make_client",
           "parse_s3_uri"]


class WeightsError(Exception):
    """A failure with a message fit for one line on stderr (no stack trace needed)."""


def config_from_env(env: Mapping[str, str] | None = None) -> S3Config:
    try:
        return _config_from_env(env)
    except S3ConfigError as e:
        raise WeightsError(str(e)) from None


def make_client(cfg: S3Config | None = None, *, max_connections: int = 10) -> Minio:
    """A minio client with bounded timeouts and a connection pool sized for ``max_connections`` threads."""
    try:
        return _make_client(cfg or config_from_env(), max_connections=max_connections)
    except S3ConfigError as e:
        raise WeightsError(str(e)) from None


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
