"""Helpers of the production-stack tests: runs over overlapping prefixes, waiting for a
share of the work before a fault, and the exactly-once / no-leak accounting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.schemas.objects import FlowRun, StateType
from support import (
    PROCESS_INVOICES,
    REPO_ROOT,
    client,
    create_run,
    manifest_entries,
    upload_invoices,
    wait_for_final_state,
)

from devtools.llm_server import LLMServerHandle
from invoiceflow import prodstack
from invoiceflow.storage import S3Store

# `make test` runs the production tests at this N; `make test-production` at 600.
INVOICES = int(os.environ.get("INVOICEFLOW_PRODUCTION_INVOICES", "90"))
SLOT_DEADLINE_S = 60


@dataclass
class Batch:
    """Invoices under `root` split over three sub-prefixes, and runs over overlapping
    prefixes of them (the whole root twice, each part, one part again)."""

    root: str
    keys: list[str]
    manifest_key: str
    results_prefix: str

    def run_prefixes(self, runs: int) -> list[str]:
        shapes = [self.root, f"{self.root}a/", f"{self.root}b/", self.root, f"{self.root}c/"]
        shapes.append(f"{self.root}a/")
        return [shapes[i % len(shapes)] for i in range(runs)]

    def params(self, prefix: str) -> dict[str, Any]:
        return {
            "source_prefix": prefix,
            "manifest_key": self.manifest_key,
            "results_prefix": self.results_prefix,
            "extractor_block": "prod-llm",
            "commit_interval_s": 0.2,
            "max_llm_concurrency": 8,
        }


def upload_batch(s3: S3Store, tag: str, n: int) -> Batch:
    root = f"{tag}/"
    keys: list[str] = []
    for index, part in enumerate("abc"):
        share = n // 3 + (1 if index < n % 3 else 0)
        keys += upload_invoices(
            s3, f"{root}{part}/", share, seed=zlib.crc32(f"{tag}{part}".encode()) % 10_000
        )
    return Batch(root, keys, f"manifests/{tag}.json", f"results/{tag}/")


def start_runs(batch: Batch, runs: int) -> list[FlowRun]:
    return [create_run(PROCESS_INVOICES, batch.params(p)) for p in batch.run_prefixes(runs)]


def wait_all(runs: list[FlowRun], timeout_s: float) -> list[FlowRun]:
    deadline = time.monotonic() + timeout_s
    return [
        wait_for_final_state(run.id, timeout_s=max(5.0, deadline - time.monotonic()))
        for run in runs
    ]


def wait_for_share(llm: LLMServerHandle, keys: list[str], share: float, timeout_s: float) -> None:
    """Until the LLM has seen `share` of these invoices: the runs are well under way."""
    wanted = max(1, int(len(keys) * share))
    deadline = time.monotonic() + timeout_s
    while sum(1 for k in keys if llm.requests_for_key(k)) < wanted:
        assert time.monotonic() < deadline, f"fewer than {wanted} invoices reached the LLM"
        time.sleep(0.5)


def result_keys(s3: S3Store, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def assert_exactly_once(s3: S3Store, llm: LLMServerHandle, batch: Batch) -> None:
    """Every invoice done, billed once at the LLM, one result object per manifest entry."""
    billed = {k: llm.requests_for_key(k) for k in batch.keys}
    assert {k: n for k, n in billed.items() if n != 1} == {}, "billed other than once"
    entries = manifest_entries(s3, batch.manifest_key)
    statuses = {k: e["status"] for k, e in entries.items()}
    assert statuses == dict.fromkeys(batch.keys, "done")
    assert len(result_keys(s3, batch.results_prefix)) == len(entries)


def assert_completed(runs: list[FlowRun]) -> None:
    states = {str(r.id): (r.state.type, r.state.message) for r in runs if r.state}
    assert all(t == StateType.COMPLETED for t, _ in states.values()), states


def taken_slots() -> dict[str, int]:
    """Active slots of every concurrency limit that is not a rate limit (decaying
    limits hold slots by design until they decay)."""
    with client() as c:
        limits = c.read_global_concurrency_limits(limit=200)
    return {
        lim.name: lim.active_slots
        for lim in limits
        if lim.active_slots and not lim.slot_decay_per_second
    }


def assert_no_slot_taken(deadline_s: float = SLOT_DEADLINE_S) -> None:
    """No limit (manifest lock, LLM slots, deployment concurrency) keeps a slot."""
    deadline = time.monotonic() + deadline_s
    while (taken := taken_slots()) and time.monotonic() < deadline:
        time.sleep(1)
    assert taken == {}, f"slots still taken: {taken}"


def finished_task_runs(flow_run_id: UUID) -> int:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        task_runs = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sum(1 for t in task_runs if t.state is not None and t.state.is_completed())


def deployment_slots(deployment_id: UUID) -> int:
    with client() as c:
        deployment = c.read_deployment(deployment_id)
    assert deployment.global_concurrency_limit is not None
    return deployment.global_concurrency_limit.active_slots


def cli(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO_ROOT) -> str:
    log.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
    )  # fmt: skip
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"invoiceflow {' '.join(args)}:\n{log.read_text()[-4000:]}"
    return result.stdout


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def worker_env() -> dict[str, str]:
    # Poll every second; log at INFO so the worker's log shows which runs it took.
    return {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}


def start_workers(info: prodstack.ProductionStack, count: int, limit: int) -> list[str]:
    from flows.deploy import worker_command

    names = [f"worker-{i}" for i in range(count)]
    for name in names:
        prodstack.start_worker(
            info, worker_command(limit=limit), name, die_with_caller=True, extra_env=worker_env()
        )
    return names
