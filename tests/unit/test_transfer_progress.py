"""Progress lines (bytes, MB/s) and the stats a pull reports."""

from __future__ import annotations

import io
import threading

from engine.progress import TransferProgress, mb_per_s
from engine.weights import PullStats


def test_live_progress_ends_with_a_full_line():
    out = io.StringIO()
    with TransferProgress("pull s3://b/m", 3_000_000, stream=out, live=True) as p:
        threads = [threading.Thread(target=lambda: [p.add(1000) for _ in range(1000)]) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    final = out.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert final.startswith("pull s3://b/m: 3.0/3.0 MB (100.0%) ")
    assert final.endswith(" MB/s")


def test_not_live_writes_nothing_to_the_stream():
    out = io.StringIO()
    with TransferProgress("push", 10, stream=out, live=False) as p:
        p.add(10)
    assert out.getvalue() == ""


def test_mb_per_s_and_stats():
    assert mb_per_s(50_000_000, 2.0) == 25.0
    assert mb_per_s(1, 0) == 0.0
    s = PullStats(files=2, total_bytes=10)
    s.add(downloaded_bytes=4, object_gets=1)
    s.add(downloaded_bytes=6, object_gets=1)
    s.seconds = 1.0
    d = s.as_dict()
    assert d["downloaded_bytes"] == 10 and d["object_gets"] == 2 and d["mb_per_s"] == 0.0
    assert "_lock" not in d
