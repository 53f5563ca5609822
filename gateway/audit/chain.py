"""Tamper evidence: a hash chain per file segment, and its verification (``llm-gateway audit verify``).

Every line of a segment carries ``"audit": {"segment": ID, "seq": N, "prev": H}`` where ``H`` is the sha256
(hex) of the exact bytes of the line before it (without its newline). Line 0 is the segment header
(``event.action: audit-segment-start``) whose ``prev`` anchors the segment: the hash of the last line of the
previous segment (named in ``audit.previous_segment``), or 64 zeros for the first one. A closed segment ends
with a footer (``audit-segment-end``). So:

- an edited line no longer hashes to the ``prev`` of the line after it;
- a deleted line leaves a gap in ``seq`` and a ``prev`` that matches no line;
- an inserted line is skipped over by the chain (the next line's ``prev`` names the line before it);
- a reordered line points to a predecessor that is elsewhere in the file;
- lines cut from the end of a closed segment show as a missing footer, and as a broken anchor when the
  next segment is verified with it.

What it cannot show: someone able to rewrite the file can recompute the whole chain. Archiving closed
segments to an object store (gateway/audit/archive.py; object lock / a separate account) and shipping
records to ELK as they are written are what pin the history down; the chain then proves which local
copy is intact. The last line of the active segment is protected only once a later line follows it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.record import dumps

GENESIS = "0" * 64
HEADER = "audit-segment-start"
FOOTER = "audit-segment-end"
RECOVERY = "audit-recovery"


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def new_segment_id() -> str:
    return os.urandom(8).hex()


class Chain:
    """The running state of one segment: seals records with ``audit.{segment,seq,prev}``."""

    def __init__(self, segment: str, seq: int = 0, prev: str = GENESIS) -> None:
        self.segment = segment
        self.seq = seq
        self.prev = prev

    def seal(self, rec: dict[str, Any]) -> bytes:
        rec["audit"] = {"segment": self.segment, "seq": self.seq, "prev": self.prev}
        line = dumps(rec)
        self.prev = line_hash(line)
        self.seq += 1
        return line


# -- verification --------------------------------------------------------------------------------------------


@dataclass
class Finding:
    path: str
    line: int  # 1-based
    kind: str  # edited | deleted | inserted | reordered | malformed | torn | header | footer | anchor
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.message}"


@dataclass
class SegmentReport:
    path: str
    segment: str | None = None
    previous_segment: str | None = None
    anchor: str | None = None
    last_hash: str | None = None
    records: int = 0
    closed: bool = False
    findings: list[Finding] = field(default_factory=list)


@dataclass
class _Line:
    no: int
    raw: bytes
    hash: str
    obj: dict[str, Any] | None
    seq: int | None
    prev: str | None
    segment: str | None
    action: str | None


def _parse(no: int, raw: bytes) -> _Line:
    obj: dict[str, Any] | None
    try:
        o = json.loads(raw)
        obj = o if isinstance(o, dict) else None
    except ValueError:
        obj = None
    a = obj.get("audit") if obj else None
    seq = prev = seg = None
    if isinstance(a, dict):
        seq = a.get("seq") if isinstance(a.get("seq"), int) else None
        prev = a.get("prev") if isinstance(a.get("prev"), str) else None
        seg = a.get("segment") if isinstance(a.get("segment"), str) else None
    ev = obj.get("event") if obj else None
    action = ev.get("action") if isinstance(ev, dict) else None
    return _Line(no, raw, line_hash(raw), obj, seq, prev, seg, action)


def verify_segment(path: str, data: bytes | None = None) -> SegmentReport:
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    rep = SegmentReport(path)
    parts = data.split(b"\n")
    tail = parts.pop()  # b"" when the file ends with a newline
    lines = [_parse(i + 1, raw) for i, raw in enumerate(parts)]
    if tail:
        rep.findings.append(
            Finding(path, len(parts) + 1, "torn", f"last line is incomplete ({len(tail)} bytes, no newline)")
        )
    if not lines:
        if not tail:
            rep.findings.append(Finding(path, 1, "header", "empty file: no segment header"))
        return rep
    add = rep.findings.append
    for ln in lines:
        if ln.obj is None:
            add(Finding(path, ln.no, "malformed", "not a JSON object (edited or corrupted)"))
    n = len(lines)
    first_at: dict[str, int] = {}
    for i, ln in enumerate(lines):
        first_at.setdefault(ln.hash, i)
    pred = [first_at.get(ln.prev) if ln.prev is not None else None for ln in lines]
    referenced = {p for p in pred if p is not None}
    inserted: set[int] = set()

    head = lines[0]
    rep.segment = head.segment
    if head.action == HEADER and head.seq == 0:
        rep.anchor = head.prev
        meta = head.obj.get("audit_meta") if head.obj else None
        rep.previous_segment = meta.get("previous_segment") if isinstance(meta, dict) else None
    elif head.seq is not None and head.seq > 0:
        add(
            Finding(
                path,
                1,
                "deleted",
                f"the segment header and records seq 0..{head.seq - 1} before line 1 are missing",
            )
        )
    else:
        add(Finding(path, 1, "header", "the first line is not a segment header"))

    for i in range(1, n):
        ln = lines[i]
        if first_at[ln.hash] != i:
            add(Finding(path, ln.no, "inserted", f"duplicate of line {first_at[ln.hash] + 1}"))
            inserted.add(i)
            continue
        j = i - 1
        while j in inserted and j > 0:
            j -= 1
        prev_ln = lines[j]
        nxt = pred[i + 1] if i + 1 < n else None
        seq_ok = ln.seq is not None and prev_ln.seq is not None and ln.seq == prev_ln.seq + 1
        if pred[i] == j and seq_ok:
            if nxt == j and i not in referenced:
                add(
                    Finding(
                        path,
                        ln.no,
                        "inserted",
                        f"the chain skips this line (line {ln.no + 1} follows line {prev_ln.no})",
                    )
                )
                inserted.add(i)
            continue
        if i not in referenced and nxt == j:
            add(
                Finding(
                    path,
                    ln.no,
                    "inserted",
                    f"not part of the chain (line {ln.no + 1} follows line {prev_ln.no})",
                )
            )
            inserted.add(i)
            continue
        if ln.obj is None:
            continue  # reported as malformed
        if ln.prev is None or ln.seq is None:
            add(Finding(path, ln.no, "inserted", "record without chain fields"))
            inserted.add(i)
            continue
        if pred[i] is not None:
            add(
                Finding(
                    path,
                    ln.no,
                    "reordered",
                    f"out of order: its predecessor is line {pred[i] + 1}, not line {prev_ln.no}",
                )
            )
        elif prev_ln.seq is not None and ln.seq > prev_ln.seq + 1:
            gap = (
                f"seq {prev_ln.seq + 1}"
                if ln.seq == prev_ln.seq + 2
                else f"seq {prev_ln.seq + 1}..{ln.seq - 1}"
            )
            add(
                Finding(
                    path,
                    ln.no,
                    "deleted",
                    f"{ln.seq - prev_ln.seq - 1} record(s) ({gap}) missing before this line",
                )
            )
        elif prev_ln.seq is not None and ln.seq <= prev_ln.seq:
            add(Finding(path, ln.no, "reordered", f"seq {ln.seq} after seq {prev_ln.seq}"))
        else:
            add(
                Finding(
                    path,
                    prev_ln.no,
                    "edited",
                    f"line {prev_ln.no} does not match the hash recorded in line {ln.no}",
                )
            )

    last = lines[-1]
    rep.last_hash = last.hash
    rep.records = sum(1 for ln in lines if ln.action not in (HEADER, FOOTER, RECOVERY))
    footers = [ln for ln in lines if ln.action == FOOTER]
    if footers:
        rep.closed = True
        if footers[-1] is not last or len(footers) > 1:
            f0 = footers[0]
            add(
                Finding(
                    path,
                    f0.no + 1 if f0 is not last else f0.no,
                    "inserted",
                    "records after the segment footer",
                )
            )
    return rep


def verify(paths: Iterable[str]) -> list[SegmentReport]:
    """Verify each file, then the anchors between segments given together (any order)."""
    reps = [verify_segment(p) for p in paths]
    by_segment = {r.segment: r for r in reps if r.segment}
    for r in reps:
        if r.previous_segment and r.previous_segment in by_segment:
            prev = by_segment[r.previous_segment]
            if prev.last_hash != r.anchor:
                r.findings.append(
                    Finding(
                        r.path,
                        1,
                        "anchor",
                        f"the header anchors to a different last record of {prev.path}: records at its end were "
                        "deleted or edited",
                    )
                )
    return reps


def expand(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".jsonl")))
        else:
            out.append(p)
    return out


def main_verify(paths: list[str], out=sys.stdout) -> int:
    """CLI body: prints each finding and a per-file summary; exit status 1 when anything is wrong."""
    files = expand(paths)
    if not files:
        print("audit verify: no files", file=out)
        return 2
    try:
        reps = verify(files)
    except OSError as e:
        print(f"audit verify: {e}", file=out)
        return 2
    bad = 0
    for r in reps:
        for f in r.findings:
            print(str(f), file=out)
        state = "closed" if r.closed else "open"
        if r.findings:
            bad += 1
            print(
                f"FAIL {r.path}: {len(r.findings)} problem(s) ({r.records} records, {state} segment)",
                file=out,
            )
        else:
            print(f"OK {r.path}: {r.records} records, {state} segment {r.segment}", file=out)
    return 1 if bad else 0
