"""Settings of the audit log: the ``audit:`` section of the gateway config (env ``GATEWAY_AUDIT__*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from configkit import StrictModel


class RedactionPattern(StrictModel):
    """An extra redaction pattern from the config: every match of ``regex`` becomes ``replacement``."""

    # Label of the pattern; matches become [NAME] unless replacement is set.
    name: str
    # Python regular expression to redact.
    regex: str
    replacement: str | None = None  # default: "[NAME]" (upper-cased name)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from None
        return v


class AuditSettings(StrictModel):
    """One record per request, written by a background task from a bounded queue.

    Durability (see gateway/audit/writer.py): a record reaches the kernel (survives ``kill -9`` of the gateway)
    at most ``write_delay`` seconds after its request ended, plus any backlog ahead of it in the queue; it is
    fsynced to disk (survives power loss / kernel crash) at most ``fsync_interval`` seconds after that.
    """

    # Write one audit record per request.
    enabled: bool = False
    # file: hash-chained, rotated segments at path; stdout: one JSON line per record for a log shipper.
    sink: Literal["stdout", "file"] = "file"
    # The active segment file; closed segments are renamed next to it (audit.<start>-<id>.jsonl).
    # One path per gateway replica (they must not share a file).
    path: str = "audit/audit.jsonl"
    # Rotate the active segment when it reaches this size (bytes) or age (seconds); 0 disables either.
    rotate_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    rotate_seconds: float = Field(default=3600.0, ge=0)
    # Longest time between a write() of records and the fsync() that makes them power-loss safe.
    fsync_interval: float = Field(default=1.0, gt=0)
    # Longest time the writer waits to gather more records into one write() (0 = write at once).
    write_delay: float = Field(default=0.0, ge=0)
    # Records waiting for the writer; when full, ``on_full`` decides.
    queue_size: int = Field(default=10000, ge=1)
    # block: new requests wait (before they reach an engine) until the writer caught up;
    # reject: new requests get 503 (code audit_backpressure) while the queue is full. Never dropped.
    on_full: Literal["block", "reject"] = "block"
    # Longest wait of a new request in "block" mode before it is refused with 503 anyway (0 = no limit).
    block_timeout: float = Field(default=30.0, ge=0)
    # none: no prompt text; hash: sha256 of the prompt; redacted: the prompt after PII redaction.
    content: Literal["none", "hash", "redacted"] = "none"
    # Extra patterns applied (after the built-in ones) in "redacted" mode.
    redaction_patterns: list[RedactionPattern] = Field(default_factory=list)
    # Archive closed segments to this bucket (S3 settings from the environment, the same variables as the
    # engine's: objectstore/s3.py). Empty: keep them locally.
    archive_bucket: str | None = None
    archive_prefix: str = "audit/"
    archive_create_bucket: bool = True
