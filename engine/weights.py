"""Push a model directory to S3 with a manifest; pull it into a local cache, verified, resumable, locked.

Cache layout (``cache_dir``), keyed by the sha256 of the manifest's bytes (``<digest>``):

    models/<digest>/            the published, fully verified model (appears by one atomic rename)
    staging/<digest>/parts/...  files being downloaded (kept across crashes: the next pull resumes them)
    staging/<digest>/files/...  files downloaded and verified in this attempt, waiting for the others
    locks/<digest>.lock         flock: one puller per model per node; the others wait, then find it published

Nothing here imports torch or vllm (push/pull run in a slim init container).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import S3Error

from engine.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    digest,
    hash_file,
    iter_model_files,
)
from engine.progress import RateLimiter, TransferProgress, mb_per_s
from engine.s3 import (
    S3Config,
    S3Uri,
    WeightsError,
    config_from_env,
    describe_error,
    make_client,
    parse_s3_uri,
)

log = logging.getLogger("engine.weights")

CHUNK = 1024 * 1024
DEFAULT_PART_SIZE = 16 * 1024 * 1024
# How often one file's download is re-tried (resuming from where it broke) after a network error.
NETWORK_RETRIES = 4

__all__ = ["WeightsError", "PullResult", "PullStats", "PushResult", "pull", "pull_model", "push", "push_model", "verify_dir", "MANIFEST_NAME"]


# ---------------------------------------------------------------------------------------------------- push


class _HashingReader:
    """A file reader that hashes what it hands out (minio reads parts sequentially) and counts progress."""

    def __init__(self, f, progress: TransferProgress | None) -> None:
        self._f = f
        self._progress = progress
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha.update(data)
        self.nbytes += len(data)
        if self._progress:
            self._progress.add(len(data))
        return data


@dataclass
class PushResult:
    manifest: Manifest
    manifest_digest: str
    uploaded_files: int
    uploaded_bytes: int
    skipped_files: int  # already in S3 with the same size and sha256 (object metadata), not sent again
    seconds: float


def push(local_dir: str | os.PathLike, uri: str, **kw) -> Manifest:
    """Upload every file of ``local_dir`` under ``uri`` (multipart above ``part_size``), then the manifest."""
    return push_model(local_dir, uri, **kw).manifest


def push_model(local_dir: str | os.PathLike, uri: str, *, concurrency: int = 4, part_size: int = DEFAULT_PART_SIZE,
               force: bool = False, live_progress: bool | None = None, client: Minio | None = None,
               cfg: S3Config | None = None) -> PushResult:
    """Hash every file, delete the prefix's manifest (readers never take a half-replaced prefix for a model),
    upload the files (skipping objects already there with the same size and sha256 unless ``force``: an
    interrupted push re-run sends only what is missing), and upload the manifest last."""
    root = Path(local_dir)
    if not root.is_dir():
        raise WeightsError(f"model directory not found: {root}")
    target = parse_s3_uri(uri)
    cfg = cfg or config_from_env()
    client = client or make_client(cfg, max_connections=concurrency * 2)
    files = list(iter_model_files(root))
    if not files:
        raise WeightsError(f"no files to push in {root}")
    manifest_key = target.key(MANIFEST_NAME)
    try:
        if not client.bucket_exists(target.bucket):
            raise WeightsError(f"bucket {target.bucket!r} does not exist at {cfg.url}")
        client.remove_object(target.bucket, manifest_key)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(describe_error(e, cfg, f"preparing {target}", target.bucket)) from None

    started = time.monotonic()
    local: dict[str, FileEntry] = {}

    def hash_one(rel: str, path: Path) -> FileEntry:
        try:
            size, sha = hash_file(path)
        except OSError as e:
            raise WeightsError(f"cannot read {path}: {e.strerror}") from None
        return FileEntry(rel, size, sha)

    _run_all(concurrency, [(hash_one, (rel, p)) for rel, p in files], on_result=lambda e: local.__setitem__(e.path, e))
    manifest = Manifest(tuple(local[rel] for rel, _ in files))

    def already_there(entry: FileEntry) -> bool:
        if force:
            return False
        try:
            st = client.stat_object(target.bucket, target.key(entry.path))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise WeightsError(describe_error(e, cfg, f"checking s3://{target.bucket}/{target.key(entry.path)}")) from None
        except Exception as e:
            raise WeightsError(describe_error(e, cfg, f"checking s3://{target.bucket}/{target.key(entry.path)}")) from None
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        return st.size == entry.size and meta.get("x-amz-meta-sha256") == entry.sha256

    todo = [e for e in manifest.files if not already_there(e)]
    total = sum(e.size for e in todo)
    log.info("push %s → %s: %d files, %.1f MB to upload (%d already there)", root, target, len(todo), total / 1e6,
             len(manifest.files) - len(todo))
    with TransferProgress(f"push {target}", total, live=live_progress, logger=log) as progress:

        def upload(entry: FileEntry) -> None:
            key = target.key(entry.path)
            path = root / entry.path
            try:
                f = open(path, "rb")
            except OSError as e:
                raise WeightsError(f"cannot read {path}: {e.strerror}") from None
            with f:
                reader = _HashingReader(f, progress)
                try:
                    client.put_object(target.bucket, key, reader, entry.size, part_size=part_size,
                                      num_parallel_uploads=2 if entry.size > part_size else 1,
                                      metadata={"sha256": entry.sha256})
                except Exception as e:
                    raise WeightsError(describe_error(e, cfg, f"uploading {entry.path} to s3://{target.bucket}/{key}")) from None
            if reader.nbytes != entry.size or reader.sha.hexdigest() != entry.sha256:
                raise WeightsError(f"{path} changed while it was being pushed; push again")

        _run_all(concurrency, [(upload, (e,)) for e in todo])

    data = manifest.to_bytes()
    try:
        client.put_object(target.bucket, manifest_key, io.BytesIO(data), len(data), content_type="application/json")
    except Exception as e:
        raise WeightsError(describe_error(e, cfg, f"uploading the manifest to s3://{target.bucket}/{manifest_key}")) from None
    secs = time.monotonic() - started
    log.info("push %s complete: %d files (%d uploaded, %.1f MB) in %.2f s (%.1f MB/s), manifest sha256 %s", target,
             len(manifest.files), len(todo), total / 1e6, secs, mb_per_s(total, secs), digest(data))
    return PushResult(manifest, digest(data), len(todo), total, len(manifest.files) - len(todo), secs)


# ---------------------------------------------------------------------------------------------------- pull


@dataclass
class PullStats:
    files: int = 0
    total_bytes: int = 0
    downloaded_bytes: int = 0  # bytes received from S3 in this run
    resumed_bytes: int = 0  # bytes of partial files kept from an earlier, interrupted run
    reused_files: int = 0  # files already downloaded and verified by an earlier run (re-verified locally)
    object_gets: int = 0  # GET requests for model files (the manifest's own GET is not counted)
    cache_hit: bool = False
    waited_for_lock: bool = False
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        d["mb_per_s"] = round(mb_per_s(self.downloaded_bytes, self.seconds), 2)
        return d


@dataclass
class PullResult:
    path: Path
    manifest_digest: str
    manifest: Manifest
    stats: PullStats


def pull(uri: str, cache_dir: str | os.PathLike, concurrency: int = 8, **kw) -> Path:
    """Pull ``uri`` into ``cache_dir`` (if not already there) and return the verified model directory."""
    return pull_model(uri, cache_dir, concurrency, **kw).path


def pull_model(uri: str, cache_dir: str | os.PathLike, concurrency: int = 8, *, max_rate: float | None = None,
               live_progress: bool | None = None, client: Minio | None = None,
               cfg: S3Config | None = None) -> PullResult:
    """Like :func:`pull`, with the manifest and what this call transferred (for logs, tests and benchmarks)."""
    try:
        return _pull_model(uri, Path(cache_dir), concurrency, max_rate, live_progress, client, cfg)
    except OSError as e:  # the local side: permissions, disk full, read-only cache
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise WeightsError(f"local filesystem error while pulling {uri} into {cache_dir}: {e.strerror or e}{where}") from None


def _pull_model(uri: str, cache_dir: Path, concurrency: int, max_rate: float | None, live_progress: bool | None,
                client: Minio | None, cfg: S3Config | None) -> PullResult:
    src = parse_s3_uri(uri)
    cfg = cfg or config_from_env()
    client = client or make_client(cfg, max_connections=concurrency)
    started = time.monotonic()
    data = _get_manifest(client, cfg, src)
    try:
        manifest = Manifest.from_bytes(data)
    except ManifestError as e:
        raise WeightsError(f"bad manifest at s3://{src.bucket}/{src.key(MANIFEST_NAME)}: {e}") from None
    key = digest(data)
    cache = Path(cache_dir).absolute()
    final = cache / "models" / key
    stats = PullStats(files=len(manifest.files), total_bytes=manifest.total_size)

    def done(path: Path) -> PullResult:
        stats.seconds = time.monotonic() - started
        return PullResult(path, key, manifest, stats)

    if (final / MANIFEST_NAME).is_file():
        stats.cache_hit = True
        log.info("pull %s: verified copy in cache (manifest %s), nothing to download: %s", src, key[:12], final)
        return done(final)

    for sub in ("models", "staging", "locks"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    with _FileLock(cache / "locks" / f"{key}.lock", f"another process is pulling {src}; waiting for it") as lock:
        stats.waited_for_lock = lock.waited
        if (final / MANIFEST_NAME).is_file():
            stats.cache_hit = True
            log.info("pull %s: another process published it meanwhile: %s", src, final)
            return done(final)
        staging = cache / "staging" / key
        _Downloader(client, cfg, src, manifest, staging, stats, concurrency, max_rate, live_progress).run()
        files_dir = staging / "files"
        with open(files_dir / MANIFEST_NAME, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(files_dir)
        if final.exists():  # debris without a manifest (not ours: we publish by rename only)
            shutil.rmtree(final)
        os.rename(files_dir, final)  # atomic publish: the directory appears complete or not at all
        _fsync_dir(final.parent)
        shutil.rmtree(staging, ignore_errors=True)
    result = done(final)
    log.info("pull %s complete: %d files, %.1f MB (downloaded %.1f MB, resumed %.1f MB) in %.2f s, %.1f MB/s → %s",
             src, stats.files, stats.total_bytes / 1e6, stats.downloaded_bytes / 1e6, stats.resumed_bytes / 1e6,
             stats.seconds, mb_per_s(stats.downloaded_bytes, stats.seconds), final)
    return result


def _get_manifest(client: Minio, cfg: S3Config, src: S3Uri) -> bytes:
    key = src.key(MANIFEST_NAME)
    resp = None
    try:
        resp = client.get_object(src.bucket, key)
        return resp.read()
    except S3Error as e:
        if e.code == "NoSuchKey":
            raise WeightsError(f"no manifest at s3://{src.bucket}/{key}: the model was never pushed there or its "
                               "push did not finish (push uploads the manifest last)") from None
        raise WeightsError(describe_error(e, cfg, f"reading the manifest of {src}", src.bucket)) from None
    except Exception as e:
        raise WeightsError(describe_error(e, cfg, f"reading the manifest of {src}", src.bucket)) from None
    finally:
        if resp is not None:
            resp.close()
            resp.release_conn()


class _Retry(Exception):
    pass


class _Downloader:
    def __init__(self, client: Minio, cfg: S3Config, src: S3Uri, manifest: Manifest, staging: Path,
                 stats: PullStats, concurrency: int, max_rate: float | None, live_progress: bool | None) -> None:
        self.client, self.cfg, self.src, self.manifest = client, cfg, src, manifest
        self.parts = staging / "parts"
        self.files = staging / "files"
        self.stats = stats
        self.concurrency = max(1, concurrency)
        self.limiter = RateLimiter(max_rate)
        self.live_progress = live_progress
        self.cancel = threading.Event()
        self.progress: TransferProgress | None = None

    def run(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        self.files.mkdir(parents=True, exist_ok=True)
        # Biggest first: the long downloads start early, the small ones fill the gaps.
        entries = sorted(self.manifest.files, key=lambda f: -f.size)
        with TransferProgress(f"pull {self.src}", self.manifest.total_size, live=self.live_progress,
                              logger=log) as progress:
            self.progress = progress
            _run_all(self.concurrency, [(self.fetch, (e,)) for e in entries], on_error=self.cancel.set)

    def fetch(self, entry: FileEntry) -> None:
        done = self.files / entry.path
        part = self.parts / entry.path
        if done.exists():
            # Downloaded and verified by an earlier, interrupted run: verify again before it is published.
            size, sha = hash_file(done)
            if size == entry.size and sha == entry.sha256:
                self.stats.add(reused_files=1, resumed_bytes=size)
                self.progress.add(size)
                return
            done.unlink()
        part.parent.mkdir(parents=True, exist_ok=True)
        done.parent.mkdir(parents=True, exist_ok=True)
        for fresh in (False, True):
            sha, resumed = self._download(entry, part, fresh)
            if sha == entry.sha256:
                os.replace(part, done)
                return
            part.unlink(missing_ok=True)
            if resumed == 0:
                break
            # The kept partial bytes may be stale (object replaced since): one more try from byte 0.
            log.warning("%s: sha256 mismatch after resuming %d bytes; downloading it again from the start", entry.path, resumed)
        raise WeightsError(
            f"sha256 mismatch for {entry.path} (s3://{self.src.bucket}/{self.src.key(entry.path)}): manifest says "
            f"{entry.sha256}, downloaded bytes hash to {sha}; nothing was published")

    def _download(self, entry: FileEntry, part: Path, fresh: bool) -> tuple[str, int]:
        """Download ``entry`` into ``part`` (resuming what is there unless ``fresh``); returns (sha256, resumed)."""
        h = hashlib.sha256()
        have = 0
        if not fresh and part.exists():
            have = part.stat().st_size
            if have > entry.size:
                have = 0
            else:
                size, h = _hash_prefix(part, have)
                have = size
        if have:
            self.stats.add(resumed_bytes=have)
            self.progress.add(have)
            log.info("%s: resuming at byte %d of %d", entry.path, have, entry.size)
        resumed = have
        key = self.src.key(entry.path)
        failures = 0
        with open(part, "r+b" if have else "wb", buffering=0) as f:
            f.seek(have)
            f.truncate()
            while have < entry.size:
                if self.cancel.is_set():
                    raise _Retry("cancelled")
                resp = None
                got = 0
                try:
                    resp = self.client.get_object(self.src.bucket, key, offset=have)
                    self.stats.add(object_gets=1)
                    for chunk in resp.stream(CHUNK):
                        if self.cancel.is_set():
                            raise _Retry("cancelled")
                        if have + len(chunk) > entry.size:
                            raise WeightsError(f"{entry.path}: object s3://{self.src.bucket}/{key} is larger than the "
                                               f"{entry.size} bytes the manifest says")
                        self.limiter.take(len(chunk))
                        try:
                            f.write(chunk)
                        except OSError as e:
                            raise WeightsError(f"cannot write {part}: {e.strerror or e}") from None
                        h.update(chunk)
                        have += len(chunk)
                        got += len(chunk)
                        self.stats.add(downloaded_bytes=len(chunk))
                        self.progress.add(len(chunk))
                except S3Error as e:
                    if e.code == "NoSuchKey":
                        raise WeightsError(f"{entry.path}: object s3://{self.src.bucket}/{key} listed in the manifest "
                                           "is missing") from None
                    if e.code == "InvalidRange":
                        raise WeightsError(f"{entry.path}: object s3://{self.src.bucket}/{key} is smaller than the "
                                           f"{entry.size} bytes the manifest says") from None
                    raise WeightsError(describe_error(e, self.cfg, f"downloading {entry.path}")) from None
                except (urllib3.exceptions.HTTPError, OSError) as e:  # network trouble: resume where it broke
                    failures += 1
                    if failures > NETWORK_RETRIES:
                        raise WeightsError(describe_error(e, self.cfg, f"downloading {entry.path}")) from None
                    log.warning("%s: network error at byte %d (%s); resuming", entry.path, have, type(e).__name__)
                    time.sleep(min(0.2 * 2**failures, 5))
                    continue
                finally:
                    if resp is not None:
                        resp.close()
                        resp.release_conn()
                if got == 0 and have < entry.size:
                    raise WeightsError(f"{entry.path}: object s3://{self.src.bucket}/{key} is smaller than the "
                                       f"{entry.size} bytes the manifest says")
            os.fsync(f.fileno())
        return h.hexdigest(), resumed


def _hash_prefix(path: Path, length: int) -> tuple[int, hashlib._Hash]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while n < length:
            block = f.read(min(4 * CHUNK, length - n))
            if not block:
                break
            h.update(block)
            n += len(block)
    return n, h


def verify_dir(model_dir: str | os.PathLike, manifest: Manifest, concurrency: int = 4) -> None:
    """Hash every file of ``model_dir`` against ``manifest``; raises WeightsError naming the first bad file."""
    root = Path(model_dir)

    def check(entry: FileEntry) -> None:
        p = root / entry.path
        if not p.is_file():
            raise WeightsError(f"{entry.path}: missing from {root}")
        size, sha = hash_file(p)
        if size != entry.size or sha != entry.sha256:
            raise WeightsError(f"sha256 mismatch for {entry.path}: manifest says {entry.sha256} ({entry.size} bytes), "
                               f"file has {sha} ({size} bytes)")

    _run_all(concurrency, [(check, (e,)) for e in manifest.files])


# ---------------------------------------------------------------------------------------------------- helpers


def _run_all(concurrency: int, tasks: list, on_result=None, on_error=None) -> None:
    """Run ``(fn, args)`` tasks on a thread pool; the first failure stops the rest and is raised."""
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(tasks) or 1)), thread_name_prefix="xfer") as pool:
        futures = [pool.submit(fn, *args) for fn, args in tasks]
        try:
            finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # KeyboardInterrupt: stop the workers at their next chunk
            if on_error:
                on_error()
            for f in futures:
                f.cancel()
            raise
        errors = [f.exception() for f in futures if f.done() and f.exception() is not None]
        if errors:
            if on_error:
                on_error()
            for f in pending:
                f.cancel()
            wait(futures)
            first = next((e for e in errors if not isinstance(e, _Retry)), errors[0])
            raise first
        if on_result:
            for f in futures:
                on_result(f.result())


class _FileLock:
    def __init__(self, path: Path, waiting_message: str) -> None:
        self.path = path
        self.message = waiting_message
        self.waited = False
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waited = True
            log.info(self.message)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
