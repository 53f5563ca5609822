"""The per-segment hash chain: ``llm-gateway audit verify`` passes on clean files and names each kind of tampering."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.audit.chain import main_verify, verify
from gateway.audit.sink import FileSink
from tests.support import REPO


def _write_segment(path: Path, n: int, *, rotate_after: int | None = None) -> list[Path]:
    """Write n records through the real FileSink; returns the files (closed segments first, then the active one)."""

    async def go() -> None:
        sink = FileSink(str(path))
        await sink.open()
        for i in range(n):
            await sink.write(
                [{"event": {"kind": "event", "id": f"req-{i}"}, "http": {"response": {"status_code": 200}}}]
            )
            if rotate_after and (i + 1) % rotate_after == 0:
                await sink.rotate()
        await sink.close(rotate=False)

    asyncio.run(go())
    return sorted(path.parent.glob(path.stem + ".*" + path.suffix)) + [path]


def _findings(*paths: Path) -> list[tuple[int, str]]:
    return [(f.line, f.kind) for r in verify([str(p) for p in paths]) for f in r.findings]


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    p = tmp_path / "audit.jsonl"
    _write_segment(p, 8)
    return p


def _lines(p: Path) -> list[bytes]:
    return p.read_bytes().split(b"\n")[:-1]


def _put(p: Path, lines: list[bytes]) -> None:
    p.write_bytes(b"".join(x + b"\n" for x in lines))


def test_clean_segment_passes(seg: Path) -> None:
    assert _findings(seg) == []
    (rep,) = verify([str(seg)])
    assert rep.records == 8 and not rep.closed


def test_edit_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    lines[4] = lines[4].replace(b'"status_code":200', b'"status_code":403')
    _put(seg, lines)
    assert _findings(seg) == [(5, "edited")]


def test_edit_of_header_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    lines[0] = lines[0].replace(b'"audit segment start"', b'"audit segment begin"')
    _put(seg, lines)
    assert _findings(seg) == [(1, "edited")]


def test_edit_into_garbage_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    lines[3] = b"not json at all"
    _put(seg, lines)
    kinds = _findings(seg)
    assert (4, "malformed") in kinds and (4, "edited") in kinds


def test_deletion_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    del lines[3]
    _put(seg, lines)
    assert _findings(seg) == [(4, "deleted")]
    lines = _lines(seg)
    del lines[5:7]
    _put(seg, lines)
    assert (6, "deleted") in _findings(seg)


def test_deleting_the_header_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    _put(seg, lines[2:])
    assert _findings(seg) == [(1, "deleted")]


def test_reorder_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    lines[3], lines[4] = lines[4], lines[3]
    _put(seg, lines)
    found = _findings(seg)
    assert found and {k for _, k in found} == {"reordered"}
    assert {ln for ln, _ in found} <= {4, 5, 6}


def test_move_far_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    moved = lines.pop(2)
    lines.insert(7, moved)
    _put(seg, lines)
    kinds = {k for _, k in _findings(seg)}
    assert "reordered" in kinds


def test_insertion_of_forged_record_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    forged = json.loads(lines[5])
    forged["event"]["id"] = "req-forged"
    _put(seg, lines[:5] + [json.dumps(forged).encode()] + lines[5:])
    assert _findings(seg) == [(6, "inserted")]


def test_insertion_with_correct_prev_hash_is_detected(seg: Path) -> None:
    """A forger who computes prev correctly still cannot make the next genuine record point at it."""
    import hashlib

    lines = _lines(seg)
    forged = json.loads(lines[5])
    forged["event"]["id"] = "req-forged"
    forged["audit"]["prev"] = hashlib.sha256(lines[4]).hexdigest()
    _put(seg, lines[:5] + [json.dumps(forged).encode()] + lines[5:])
    assert _findings(seg) == [(6, "inserted")]


def test_insertion_of_duplicate_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    _put(seg, lines[:6] + [lines[2]] + lines[6:])
    assert _findings(seg) == [(7, "inserted")]


def test_plain_line_without_chain_is_detected(seg: Path) -> None:
    lines = _lines(seg)
    _put(seg, lines[:3] + [b'{"event":{"id":"x"}}'] + lines[3:])
    assert _findings(seg) == [(4, "inserted")]


def test_torn_last_line_is_reported(seg: Path) -> None:
    with open(seg, "ab") as f:
        f.write(b'{"event":{"kind":"ev')
    assert _findings(seg) == [(10, "torn")]


def test_segments_anchor_each_other(tmp_path: Path) -> None:
    files = _write_segment(tmp_path / "audit.jsonl", 9, rotate_after=4)
    assert len(files) == 3
    assert _findings(*files) == []
    reps = verify([str(p) for p in files])
    assert [r.closed for r in reps] == [True, True, False]
    assert reps[1].previous_segment == reps[0].segment
    # Cutting the last records (footer included) off a closed segment: missing footer → anchor breaks.
    lines = _lines(files[0])
    _put(files[0], lines[:-2])
    found = _findings(*files)
    assert (1, "anchor") in found


def test_records_after_footer_are_detected(tmp_path: Path) -> None:
    files = _write_segment(tmp_path / "audit.jsonl", 4, rotate_after=4)
    closed = files[0]
    lines = _lines(closed)
    extra = json.loads(lines[-1])
    extra["audit"]["seq"] += 1
    _put(closed, lines + [json.dumps(extra).encode()])
    assert any(k == "inserted" for _, k in _findings(closed))


def test_cli_verify_exit_status(seg: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "gateway", "audit", "verify"]
    env = {"PYTHONPATH": str(REPO)}
    ok = subprocess.run(cmd + [str(seg)], capture_output=True, text=True, env=env, cwd=str(REPO))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK ")
    lines = _lines(seg)
    lines[2] = lines[2].replace(b"req-1", b"req-X")
    _put(seg, lines)
    bad = subprocess.run(cmd + [str(tmp_path)], capture_output=True, text=True, env=env, cwd=str(REPO))
    assert bad.returncode == 1
    assert f"{seg}:3: edited" in bad.stdout and "FAIL" in bad.stdout


def test_main_verify_in_process(seg: Path) -> None:
    import io

    out = io.StringIO()
    assert main_verify([str(seg)], out) == 0
    lines = _lines(seg)
    del lines[1]
    _put(seg, lines)
    out = io.StringIO()
    assert main_verify([str(seg)], out) == 1
    assert ":2: deleted" in out.getvalue()
