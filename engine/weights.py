"""Push a model directory to S3 with a manifest; pull it into a local cache, verified, resumable, locked.

Cache layout (``cache_dir``), keyed by the sha256 of the manifest's bytes (``<digest>``):

    models/<digest>/            the published, fully verified model (appears by one atomic rename)
    verified/<digest>.json      size and mtime of each published file when it was last hashed (the cheap check)
    sources/<sha256(uri)>.json  the manifest digest last verified for each source URI (start without S3)
    staging/<digest>/parts/...  files being downloaded (kept across crashes: the next pull resumes them)
    staging/<digest>/files/...  files downloaded and verified in this attempt, waiting for the others
    locks/<digest>.lock         flock: one puller per model per node; the others wait, then find it published

A cache hit is checked before it is used (``verify_cache``): ``none`` trusts it, ``size`` (default) compares each
file's size with the manifest and its mtime with ``verified/`` (a changed mtime re-hashes that file), ``full``
re-hashes every file. A copy that fails is evicted: its good files go back to ``staging/<digest>/files`` (the
download re-verifies and keeps them), the bad ones are deleted and fetched again. A file that another published
copy already has (the same size and sha256: a new version of a model that changed a few files) is hard-linked
from it and re-hashed, not downloaded.

Nothing here imports torch or vllm (push/pull run in a slim init container).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
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
    is_unreachable,
    make_client,
    parse_s3_uri,
)
from objectstore import CredentialsError

log = logging.getLogger("engine.weights")

CHUNK = 1024 * 1024
DEFAULT_PART_SIZE = 16 * 1024 * 1024
# How often one file's download is re-tried (resuming from where it broke) after a network error.
NETWORK_RETRIES = 4

# How a cache hit is checked before it is used (``llm-engine pull --verify-cache``, ENGINE_VERIFY_CACHE).
VERIFY_MODES = ("none", "size", "full")

__all__ = ["WeightsError", "SourceUnreachable", "PullResult", "PullStats", "PushResult", "VERIFY_MODES", "pull",
           "pull_model", "push", "push_model", "verify_dir", "MANIFEST_NAME"]


class SourceUnreachable(WeightsError):
    """S3 could not be reached (network error, timeout, 5xx): a verified cached copy may be used instead."""


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
    verify_cache: str = "size"  # how the cached copy was checked (none | size | full)
    rehashed_files: int = 0  # cached files hashed again by that check
    rehashed_bytes: int = 0
    evicted: bool = False  # the cached copy failed the check and was taken out of models/
    source_unreachable: bool = False  # S3 could not be reached; the last verified copy was used
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
               live_progress: bool | None = None, client: Minio | None = None, cfg: S3Config | None = None,
               verify_cache: str = "size", require_source: bool = False) -> PullResult:
    """Like :func:`pull`, with the manifest and what this call transferred (for logs, tests and benchmarks).

    ``verify_cache``: how a cached copy is checked before it is used (see the module's docstring).
    ``require_source``: fail when S3 cannot be reached, instead of starting from the last verified copy.
    """
    if verify_cache not in VERIFY_MODES:
        raise WeightsError(f"verify-cache must be one of {', '.join(VERIFY_MODES)}, not {verify_cache!r}")
    from engine.metrics import record_pull, record_source

    try:
        result = _Puller(uri, Path(cache_dir), concurrency, max_rate, live_progress, client, cfg, verify_cache,
                         require_source).run()
    except OSError as e:  # the local side: permissions, disk full, read-only cache
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise WeightsError(f"local filesystem error while pulling {uri} into {cache_dir}: {e.strerror or e}{where}") from None
    record_pull(result.stats.downloaded_bytes, result.stats.seconds, result.stats.cache_hit)
    record_source(uri, reachable=not result.stats.source_unreachable)
    return result


class _Puller:
    def __init__(self, uri: str, cache_dir: Path, concurrency: int, max_rate: float | None,
                 live_progress: bool | None, client: Minio | None, cfg: S3Config | None, verify_cache: str,
                 require_source: bool) -> None:
        self.uri = uri
        self.src = parse_s3_uri(uri)
        self.cache = Path(cache_dir).absolute()
        self.concurrency = max(1, concurrency)
        self.max_rate = max_rate
        self.live_progress = live_progress
        self.cfg = cfg or config_from_env()
        self.client = client or make_client(self.cfg, max_connections=self.concurrency)
        self.verify_cache = verify_cache
        self.require_source = require_source
        self.started = time.monotonic()

    def run(self) -> PullResult:
        src, cache = self.src, self.cache
        data, unreachable = self._manifest_bytes()
        try:
            manifest = Manifest.from_bytes(data)
        except ManifestError as e:
            raise WeightsError(f"bad manifest at s3://{src.bucket}/{src.key(MANIFEST_NAME)}: {e}") from None
        key = digest(data)
        final = cache / "models" / key
        stats = PullStats(files=len(manifest.files), total_bytes=manifest.total_size, verify_cache=self.verify_cache,
                          source_unreachable=unreachable)

        def done(path: Path) -> PullResult:
            stats.seconds = time.monotonic() - self.started
            if not unreachable:
                _remember_source(cache, self.uri, key, self.cfg)
            return PullResult(path, key, manifest, stats)

        fingerprint_before: tuple[int, int] | None = None
        if (final / MANIFEST_NAME).is_file():
            fingerprint_before = _stat_key(_fingerprint_path(cache, key))
            bad = _CacheCheck(final, key, manifest, self.verify_cache, self.concurrency, stats).run()
            if not bad:
                stats.cache_hit = True
                log.info("pull %s: verified copy in cache (manifest %s, checked: %s), nothing to download: %s", src,
                         key[:12], self.verify_cache, final)
                return done(final)
        else:
            bad = None
        if unreachable and bad is None:
            # The source record pointed at a copy that is gone (should not happen: records follow publishes).
            raise WeightsError(f"S3 is unreachable and the last verified copy of {src} ({key[:12]}) is no longer in "
                               f"{cache}")

        for sub in ("models", "staging", "locks"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        staging = cache / "staging" / key
        with _FileLock(cache / "locks" / f"{key}.lock", f"another process is pulling {src}; waiting for it") as lock:
            stats.waited_for_lock = lock.waited
            if bad and _stat_key(_fingerprint_path(cache, key)) != fingerprint_before:
                # Another process repaired (or re-checked) the copy while we waited for the lock: it re-recorded
                # the fingerprint after hashing what it changed, so the cheap check decides.
                bad = _CacheCheck(final, key, manifest, "size", self.concurrency, stats).run() \
                    if (final / MANIFEST_NAME).is_file() else bad
                if not bad:
                    stats.cache_hit = True
                    log.info("pull %s: another process repaired the cached copy meanwhile: %s", src, final)
                    return done(final)
            if bad:
                _evict(final, staging, key, bad)
                stats.evicted = True
                if unreachable:
                    raise WeightsError(f"the cached copy of {src} failed verification ({bad[0][1]}) and S3 is unreachable, "
                                       "so it cannot be downloaded again; the bad file was removed from the cache")
                log.warning("pull %s: cached copy failed verification (%s); evicted, downloading what is missing", src,
                            bad[0][1])
            elif (final / MANIFEST_NAME).is_file():
                stats.cache_hit = True
                log.info("pull %s: another process published it meanwhile: %s", src, final)
                return done(final)
            _Downloader(self.client, self.cfg, src, manifest, staging, stats, self.concurrency, self.max_rate,
                        self.live_progress).run()
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
            _write_fingerprint(cache, key, final, manifest)
            shutil.rmtree(staging, ignore_errors=True)
        result = done(final)
        log.info("pull %s complete: %d files, %.1f MB (downloaded %.1f MB, resumed %.1f MB) in %.2f s, %.1f MB/s → %s",
                 src, stats.files, stats.total_bytes / 1e6, stats.downloaded_bytes / 1e6, stats.resumed_bytes / 1e6,
                 stats.seconds, mb_per_s(stats.downloaded_bytes, stats.seconds), final)
        return result

    def _manifest_bytes(self) -> tuple[bytes, bool]:
        """The source's manifest, or (S3 unreachable, source not required) the last one verified for this URI."""
        try:
            return _get_manifest(self.client, self.cfg, self.src), False
        except SourceUnreachable as e:
            if self.require_source:
                raise WeightsError(f"{e} (the source is required: --require-source / ENGINE_REQUIRE_SOURCE)") from None
            data = _last_verified(self.cache, self.uri)
            if data is None:
                raise WeightsError(f"{e}; no verified copy of {self.src} in {self.cache} to start from") from None
            log.warning("pull %s: S3 unreachable (%s); using the last verified copy (manifest %s) from the cache",
                        self.src, e, digest(data)[:12])
            return data, True


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
        cls = SourceUnreachable if is_unreachable(e) else WeightsError
        raise cls(describe_error(e, cfg, f"reading the manifest of {src}", src.bucket)) from None
    finally:
        if resp is not None:
            resp.close()
            resp.release_conn()


# ------------------------------------------------------------------------------------------- cache bookkeeping


def _source_record(cache: Path, uri: str) -> Path:
    return cache / "sources" / f"{hashlib.sha256(uri.encode()).hexdigest()}.json"


def _write_json_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` by rename. Bookkeeping only: on a read-only or full cache a warning, never a failed pull
    (a missing record costs a re-hash or no fallback later, nothing wrong is served)."""
    try:
        _write_json_atomic_or_raise(path, doc)
    except OSError as e:
        log.warning("cannot record %s in the cache: %s", path, e.strerror or e)


def _write_json_atomic_or_raise(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remember_source(cache: Path, uri: str, key: str, cfg: S3Config) -> None:
    """Record that ``uri`` (at ``cfg``'s endpoint) served manifest ``key`` and its copy verified."""
    path = _source_record(cache, uri)
    doc = {"uri": uri, "endpoint": cfg.url, "manifest_sha256": key}
    try:
        if path.is_file() and {k: v for k, v in json.loads(path.read_text()).items() if k != "verified_at"} == doc:
            return
    except (OSError, ValueError):
        pass
    _write_json_atomic(path, {**doc, "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _last_verified(cache: Path, uri: str) -> bytes | None:
    """The manifest bytes of the copy last verified for ``uri``, if that copy is still published."""
    try:
        key = json.loads(_source_record(cache, uri).read_text())["manifest_sha256"]
        data = (cache / "models" / key / MANIFEST_NAME).read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if digest(data) == key else None


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _fingerprint_path(cache: Path, key: str) -> Path:
    return cache / "verified" / f"{key}.json"


def _write_fingerprint(cache: Path, key: str, final: Path, manifest: Manifest,
                       known: dict[str, list[int]] | None = None) -> None:
    files = dict(known or {})
    for e in manifest.files:
        if e.path not in files:
            st = os.stat(final / e.path)
            files[e.path] = [st.st_size, st.st_mtime_ns]
    _write_json_atomic(_fingerprint_path(cache, key), {"manifest_sha256": key, "files": files})


class _CacheCheck:
    """Checks a published copy against its manifest; returns the problems found (empty: the copy is good)."""

    def __init__(self, final: Path, key: str, manifest: Manifest, mode: str, concurrency: int,
                 stats: PullStats) -> None:
        self.final, self.key, self.manifest, self.mode = final, key, manifest, mode
        self.cache = final.parent.parent
        self.concurrency = concurrency
        self.stats = stats

    def run(self) -> list[tuple[str, str]]:
        """(file, problem) for each file that failed, sorted; empty when the copy is good."""
        if self.mode == "none":
            return []
        try:
            doc = json.loads(_fingerprint_path(self.cache, self.key).read_text())
            known: dict[str, list[int]] = {p: list(v) for p, v in doc["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            known = {}  # published before fingerprints existed (or the file was lost): hash once, then record
        bad: list[tuple[str, str]] = []
        fresh: dict[str, list[int]] = {}
        to_hash: list[FileEntry] = []
        for e in self.manifest.files:
            p = self.final / e.path
            try:
                st = os.stat(p)
            except FileNotFoundError:
                bad.append((e.path, f"{e.path}: missing from {self.final}"))
                continue
            if st.st_size != e.size:
                bad.append((e.path, f"{e.path}: {st.st_size} bytes, the manifest says {e.size}"))
                continue
            if self.mode == "full" or known.get(e.path) != [st.st_size, st.st_mtime_ns]:
                to_hash.append(e)
            else:
                fresh[e.path] = known[e.path]
        if bad:
            return sorted(bad)
        lock = threading.Lock()

        def check(e: FileEntry) -> None:
            p = self.final / e.path
            before = os.stat(p)
            size, sha = hash_file(p)
            self.stats.add(rehashed_files=1, rehashed_bytes=size)
            with lock:
                if size != e.size or sha != e.sha256:
                    bad.append((e.path, f"sha256 mismatch for {e.path}: the manifest says {e.sha256}, the cached file "
                                        f"has {sha}"))
                else:
                    fresh[e.path] = [before.st_size, before.st_mtime_ns]

        if to_hash:
            started = time.monotonic()
            _run_all(self.concurrency, [(check, (e,)) for e in to_hash])
            secs = time.monotonic() - started
            log.info("cache check (%s) of %s: hashed %d files, %.1f MB in %.2f s (%.1f MB/s)", self.mode, self.final,
                     len(to_hash), self.stats.rehashed_bytes / 1e6, secs, mb_per_s(self.stats.rehashed_bytes, secs))
        if bad:
            return sorted(bad)
        if fresh != known:
            _write_fingerprint(self.cache, self.key, self.final, self.manifest, fresh)
        return []


def _evict(final: Path, staging: Path, key: str, bad: list[tuple[str, str]]) -> None:
    """Take a copy that failed its check out of ``models/``: bad files are deleted, the others go back to
    ``staging/<key>/files`` (the download re-verifies them before they are published again)."""
    if not (final / MANIFEST_NAME).is_file():
        return  # another process evicted (or replaced) it while we waited for the lock
    (final / MANIFEST_NAME).unlink()
    _fsync_dir(final)
    _fingerprint_path(final.parent.parent, key).unlink(missing_ok=True)
    for rel, _ in bad:
        (final / rel).unlink(missing_ok=True)
    files_dir = staging / "files"
    staging.mkdir(parents=True, exist_ok=True)
    if files_dir.exists():
        shutil.rmtree(files_dir)
    os.rename(final, files_dir)
    log.warning("evicted %s from the cache (%s)", final, "; ".join(m for _, m in bad[:3]) + (" ..." if len(bad) > 3 else ""))


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
        self.donors: dict[tuple[int, str], Path] = {}

    def run(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        self.files.mkdir(parents=True, exist_ok=True)
        self.donors = _published_files(self.files.parent.parent.parent / "models")
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
        if self._from_donor(entry, part, done):
            return
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

    def _from_donor(self, entry: FileEntry, part: Path, done: Path) -> bool:
        """Take the file from another verified copy in the cache (the same size and sha256 under another
        manifest: a new version of a model that changed a few files) instead of downloading it."""
        donor = self.donors.get((entry.size, entry.sha256))
        if donor is None or entry.size == 0:
            return False
        part.unlink(missing_ok=True)
        try:
            os.link(donor, part)  # same filesystem: no copy; the published file is never written to
        except OSError:
            try:
                shutil.copyfile(donor, part)
            except OSError:
                part.unlink(missing_ok=True)
                return False
        size, sha = hash_file(part)
        if size != entry.size or sha != entry.sha256:  # the donor was damaged: download instead
            log.warning("%s: cached copy %s does not match its manifest; downloading the file", entry.path, donor)
            part.unlink()
            return False
        os.replace(part, done)
        self.stats.add(reused_files=1, resumed_bytes=size)
        self.progress.add(size)
        return True

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
                except CredentialsError as e:  # refreshing temporary credentials failed
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


def _published_files(models: Path) -> dict[tuple[int, str], Path]:
    """(size, sha256) → path of every file of every published (verified) copy under ``models``."""
    out: dict[tuple[int, str], Path] = {}
    try:
        dirs = list(models.iterdir())
    except OSError:
        return out
    for d in dirs:
        try:
            m = Manifest.from_bytes((d / MANIFEST_NAME).read_bytes())
        except (OSError, ManifestError):
            continue
        for e in m.files:
            out.setdefault((e.size, e.sha256), d / e.path)
    return out


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
