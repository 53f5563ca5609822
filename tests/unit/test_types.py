"""The type checker over gateway/ and engine/ (settings in pyproject's [tool.mypy]; strict on the request path)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mypy_passes_on_gateway_and_engine():
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(REPO / ".cache" / "mypy")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout
