"""Archive closed audit segments to S3/MinIO; delete the local copy only after the upload is verified.

Object key: ``<archive_prefix><hostname>/<segment file name>``. The upload carries the file's sha256 as user
metadata (``x-amz-meta-sha256``). Verification, before the local file is removed:

1. HEAD (``stat_object``): the stored size and sha256 metadata equal the local file's;
2. GET: the object's bytes are read back and hashed; that sha256 must equal the local one.

Only then is the local segment deleted. Any failure leaves the file in place (the writer retries, and the
next start picks up every closed segment still in the directory). The S3 settings are the ones the engine reads
(``objectstore``: endpoint, region, static keys with session token, web identity, container or instance
credentials, CA bundle, verify flag; see docs/weights.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket

log = logging.getLogger("gateway.audit")

_CHUNK = 1 << 20


class ArchiveError(Exception):
    pass


def file_sha256(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def minio_client_from_env():
    """The S3 client of the audit archive, from the same variables as the engine's (raises ArchiveError naming a
    wrong setting)."""
    from objectstore import S3ConfigError, config_from_env, make_client

    try:
        return make_client(config_from_env(), max_connections=2)
    except S3ConfigError as e:
        raise ArchiveError(f"audit archive: {e}") from None


class Archiver:
    """Uploads one closed segment at a time (blocking; the writer runs it in a thread)."""

    def __init__(
        self,
        client,
        bucket: str,
        prefix: str = "audit/",
        *,
        create_bucket: bool = True,
        host: str | None = None,
    ):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.host = host or socket.gethostname()
        self.create_bucket = create_bucket
        self._bucket_ok = False
        self.archived: list[str] = []  # object keys uploaded and verified by this process

    @classmethod
    def from_env(cls, settings) -> Archiver:
        return cls(
            minio_client_from_env(),
            settings.archive_bucket,
            settings.archive_prefix,
            create_bucket=settings.archive_create_bucket,
        )

    def key_for(self, path: str) -> str:
        return f"{self.prefix}{self.host}/{os.path.basename(path)}"

    def _ensure_bucket(self) -> None:
        if self._bucket_ok:
            return
        if self.create_bucket and not self.client.bucket_exists(self.bucket):
            self.client.make_bucket(self.bucket)
        self._bucket_ok = True

    def archive(self, path: str) -> str:
        """Upload ``path``, verify it (HEAD + read-back sha256), then delete it; returns the object key."""
        self._ensure_bucket()
        digest, size = file_sha256(path)
        key = self.key_for(path)
        with open(path, "rb") as f:
            self.client.put_object(
                self.bucket,
                key,
                f,
                size,
                content_type="application/x-ndjson",
                metadata={"sha256": digest},
            )
        self.verify(key, digest, size)
        os.remove(path)
        self.archived.append(key)
        log.info(
            "audit: segment archived",
            extra={"bucket": self.bucket, "key": key, "sha256": digest, "bytes": size},
        )
        return key

    def verify(self, key: str, digest: str, size: int) -> None:
        st = self.client.stat_object(self.bucket, key)
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        if st.size != size:
            raise ArchiveError(f"{key}: stored size {st.size} != local {size}")
        if meta.get("x-amz-meta-sha256") != digest:
            raise ArchiveError(f"{key}: stored sha256 metadata {meta.get('x-amz-meta-sha256')!r} != {digest}")
        resp = self.client.get_object(self.bucket, key)
        try:
            h = hashlib.sha256()
            for chunk in resp.stream(_CHUNK):
                h.update(chunk)
        finally:
            resp.close()
            resp.release_conn()
        if h.hexdigest() != digest:
            raise ArchiveError(f"{key}: read-back sha256 {h.hexdigest()} != {digest}")
