"""`invoiceflow up` with PREFECT_API_URL set starts no second server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_up_uses_the_configured_server_and_starts_nothing(tmp_path: Path) -> None:
    team_server = "http://127.0.0.1:9/api"  # nothing listens there: it must not be needed
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "up", "--state-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PREFECT_API_URL": team_server},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    assert f"using the Prefect server at {team_server}" in said
    assert "invoiceflow up --local" in said
    assert "invoiceflow provision" in said
    assert list(tmp_path.iterdir()) == []  # no state, no server
