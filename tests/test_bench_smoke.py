"""`make bench` end to end on a tiny corpus: the harness runs and its JSON is complete.

It asserts correctness only (keys present, every contender ran, nothing lost), never
speed: figures on a shared 2-core machine are noise at this size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_KEYS = {
    "n",
    "latency_s",
    "concurrency",
    "ideal_s",
    "pipeline_wall_s",
    "seed_wall_s",
    "naive_wall_s",
    "naive_n",
    "manifest_writes",
    "slot_acquisitions",
    "lost_updates",
    "cpu_ms_per_invoice",
    "peak_rss_mb",
    "llm_slot_utilisation",
    "contenders",
}


def _run_bench(output: Path, module: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run a benchmark module as `make bench` does; the JSON it wrote to `output`."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, "--output", str(output)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(output.read_text())


def test_bench_harness_writes_complete_results(tmp_path: Path) -> None:
    # The harness starts its own stack; don't let it inherit the test session's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    doc = _run_bench(
        tmp_path / "bench-results.json", "benchmarks.run", "--n", "20", "--latency", "0.05",
        "--concurrency", "8", "--naive-n", "10", env=env,
    )  # fmt: skip
    assert set(doc) == TOP_LEVEL_KEYS
    assert (doc["n"], doc["naive_n"], doc["concurrency"]) == (20, 10, 8)
    assert doc["lost_updates"] == 0
    assert 0 < doc["llm_slot_utilisation"] <= 1
    assert set(doc["contenders"]) == {"seed", "naive", "pipeline"}
    for name, contender in doc["contenders"].items():
        assert contender["status"] == "ok", (name, contender.get("error"))
        assert contender["lost_updates"] == 0, name
        assert contender["manifest_done"] == contender["listed"] == contender["n"], name
    # One write per update: the seed records each invoice once; naive Prefect commits at
    # least a claim and a `done` per invoice, each under its own slot acquisition. The
    # pipeline group-commits, so it writes less often than once per invoice.
    naive = doc["contenders"]["naive"]
    assert doc["contenders"]["seed"]["manifest_writes"] == 20
    assert naive["slot_acquisitions"] >= naive["manifest_writes"] >= 2 * 10
    assert 1 <= doc["manifest_writes"] < 20
    assert doc["slot_acquisitions"] >= doc["manifest_writes"]
    assert doc["cpu_ms_per_invoice"] > 0 and doc["peak_rss_mb"] > 0


def test_manifest_scale_bench_times_each_commit_and_reports_its_size(tmp_path: Path) -> None:
    """`benchmarks.manifest_scale` through the real `ManifestStore` (its body is a file)."""
    rows = _run_bench(
        tmp_path / "bench-manifest-scale.json", "benchmarks.manifest_scale",
        "--entries", "50", "--repeat", "1",
    )["commits"]  # fmt: skip
    assert [(r["updates"], r["batch"]) for r in rows] == [
        ("claim", 1), ("claim", 1000), ("done", 1), ("done", 16)
    ]  # fmt: skip
    # Each body holds every entry so far: 1,000 more claims make a larger one.
    assert all(r["bytes"] > 0 for r in rows)
    assert rows[1]["bytes"] > rows[0]["bytes"] + 1000 * 100
