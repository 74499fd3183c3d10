"""`python -m benchmarks.run --stack production`: the embedded stack against Prefect's
production stack, through deployments and process workers, as they are operated.

For each stack (embedded: one SQLite server; production: Postgres, Redis, 2 API
replicas behind haproxy with TLS and basic auth) it provisions and deploys with the CLI,
then for 1, 2 and 3 workers (`--limit 1` each) uploads N invoices split over three
prefixes, starts one deployment run per prefix and times them to the last final state.
Figures per (stack, workers):

- `wall_s`, `invoices_per_s`: first run created -> last run final;
- `orchestration_cpu_ms_per_invoice`: CPU of every stack process tree (Prefect server or
  replicas + services + Postgres + Redis + haproxy) and of the workers with their flow-run
  subprocesses, over the window, per invoice (S3 and LLM servers excluded);
- `slot_wait_*`: a probe in this process takes the manifest lock about once a second
  during the runs (lease, 423 + Retry-After, as `concurrency()` does) and records how
  long each take waited;
- `llm_requests` vs N and `done` vs N: nothing lost, nothing billed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from benchmarks.measure import CpuWindow, generate_pdfs, upload_pdfs
from devtools.llm_server import LLMServerHandle
from invoiceflow import defaults, prodstack, stack
from invoiceflow.storage import S3Store, make_s3_client

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "process-invoices/process-invoices"
LOCK = defaults.MANIFEST_LOCK
PARTS = ("a", "b", "c")


@dataclass
class Target:
    """One started stack, as the harness needs it."""

    kind: str
    env: dict[str, str]
    s3_endpoint: str
    bucket: str
    pids: dict[str, int]
    state_dir: Path


@contextlib.contextmanager
def started(kind: str, workdir: Path) -> Iterator[Target]:
    state = workdir / kind
    if kind == "embedded":
        info, _ = stack.up(
            state, prefect_port=stack.free_port(), s3_port=stack.free_port(),
            bucket="invoiceflow-bench", die_with_caller=True,
        )  # fmt: skip
        try:
            yield Target(kind, info.env(), info.s3_endpoint, info.bucket,
                         {"prefect": info.prefect_pid}, state)  # fmt: skip
        finally:
            stack.down(state)
        return
    prod, _ = prodstack.up_production(
        state, replicas=2, bucket="invoiceflow-bench", die_with_caller=True
    )
    try:
        servers = {k: v for k, v in prod.pids.items() if k != "s3"}
        yield Target(kind, prod.env(), prod.s3_endpoint, prod.bucket, servers, state)
    finally:
        prodstack.purge(state)


def _cli(target: Target, *args: str) -> None:
    log = target.state_dir / f"cli-{args[0]}.log"
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], cwd=REPO_ROOT,
            env={**os.environ, **target.env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"invoiceflow {' '.join(args)} failed; see {log}")


@contextlib.contextmanager
def talking_to(target: Target) -> Iterator[None]:
    """Prefect clients made in this process (this thread) use `target`'s server."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_URL,
        temporary_settings,
    )

    updates: dict[Any, Any] = {PREFECT_API_URL: target.env["PREFECT_API_URL"]}
    if "PREFECT_API_AUTH_STRING" in target.env:
        updates[PREFECT_API_AUTH_STRING] = target.env["PREFECT_API_AUTH_STRING"]
        updates[PREFECT_API_SSL_CERT_FILE] = target.env["PREFECT_API_SSL_CERT_FILE"]
    with temporary_settings(updates=updates):
        yield


def prepare(target: Target, llm: LLMServerHandle, api_key: str, concurrency: int) -> None:
    """`invoiceflow provision` + `invoiceflow deploy`, the LLM extractor block, no schedule."""
    from prefect.client.orchestration import get_client
    from pydantic import SecretStr

    from blocks.extractor import ExtractorBlock

    _cli(target, "provision", "--bucket", target.bucket, "--endpoint-url",
         target.s3_endpoint, "--create-bucket", "--store-keys")  # fmt: skip
    _cli(target, "deploy")
    ExtractorBlock(
        kind="openai", base_url=llm.base_url, model="bench-model",
        api_key=SecretStr(api_key), max_in_flight=concurrency,
    ).save("bench-llm", overwrite=True, _sync=True)  # fmt: skip
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        for schedule in client.read_deployment_schedules(deployment.id):
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)


class SlotProbe:
    """Takes the manifest lock about once a second in a thread; records each wait."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-probe", daemon=True)

    def __enter__(self) -> SlotProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)

    def _run(self) -> None:
        with talking_to(self.target):
            asyncio.run(self._probe())

    async def _probe(self) -> None:
        from prefect.client.orchestration import get_client

        # Not `concurrency()`: its acquisition runs in a process-wide service thread
        # whose client ignores this thread's settings (the stack being measured).
        async with get_client() as client:
            while not self._stop.is_set():
                self.waits.append(await _take_manifest_slot(client))
                await asyncio.sleep(1.0)

    def figures(self) -> dict[str, Any]:
        if not self.waits:
            return {"slot_probes": 0}
        ordered = sorted(self.waits)
        return {
            "slot_probes": len(ordered),
            "slot_wait_median_s": round(statistics.median(ordered), 3),
            "slot_wait_p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
            "slot_wait_max_s": round(ordered[-1], 3),
        }


async def _take_manifest_slot(client: Any) -> float:
    """Acquire and release the manifest lock the way `concurrency()` does (a 423 says
    wait `Retry-After` and ask again); returns the seconds until it was granted."""
    asked = time.monotonic()
    while True:
        try:
            granted = await client.increment_concurrency_slots_with_lease(
                names=[LOCK], slots=1, mode="concurrency", lease_duration=60
            )
            break
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            await asyncio.sleep(float(exc.response.headers.get("Retry-After", "1")))
    waited = time.monotonic() - asked
    await client.release_concurrency_slots_with_lease(UUID(granted.json()["lease_id"]))
    return waited


def _start_workers(target: Target, count: int) -> list[int]:
    from flows.deploy import worker_command

    env = {**os.environ, **target.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    logs = target.state_dir / "logs"
    return [
        stack._spawn(
            worker_command(limit=1),
            logs / f"bench-worker-{i}.log",
            env,
            die_with_parent=True,
            cwd=REPO_ROOT,
        )
        for i in range(count)
    ]


def _runs_final(run_ids: list[Any], timeout_s: float) -> list[str]:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in run_ids]
            if all(r.state is not None and r.state.is_final() for r in runs):
                return [r.state.type.value for r in runs if r.state is not None]
            if time.monotonic() > deadline:
                return ["TIMED_OUT"]
            time.sleep(1)


def measure(
    target: Target, s3: S3Store, llm: LLMServerHandle, pdfs: list[tuple[str, bytes]],
    workers: int, tag: str, timeout_s: float,
) -> dict[str, Any]:  # fmt: skip
    """N invoices over three prefixes, one run each, `workers` workers of limit 1."""
    from prefect.client.orchestration import get_client

    root = f"bench/{tag}/"
    for index, part in enumerate(PARTS):
        upload_pdfs(s3, f"{root}{part}/", pdfs[index :: len(PARTS)])
    llm.reset()
    pids = _start_workers(target, workers)
    windows = [CpuWindow(pid).start() for pid in [*target.pids.values(), *pids]]
    started = time.monotonic()
    with SlotProbe(target) as probe, get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        run_ids = [
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"params": _params(root, part, tag)}
            ).id
            for part in PARTS
        ]
        states = _runs_final(run_ids, timeout_s)
    wall = time.monotonic() - started
    cpu = sum(w.stop().cpu_s for w in windows)
    for pid in pids:
        stack._stop(pid, first_signal=2)  # a worker stops cleanly on SIGINT
    stats = llm.stats()
    return {
        "stack": target.kind, "workers": workers, "n": len(pdfs), "states": states,
        "wall_s": round(wall, 2), "invoices_per_s": round(len(pdfs) / wall, 3),
        "orchestration_cpu_ms_per_invoice": round(cpu / len(pdfs) * 1000, 1),
        "llm_requests": stats["total"], **probe.figures(),
    }  # fmt: skip


def _params(root: str, part: str, tag: str) -> dict[str, Any]:
    return {
        "source_prefix": f"{root}{part}/",
        "manifest_key": f"bench/{tag}-manifest.json",
        "results_prefix": f"bench-results/{tag}/{part}/",
        "extractor_block": "bench-llm",
    }


def _s3_client(target: Target) -> Any:
    return make_s3_client(
        endpoint_url=target.s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x"
    )


def run_stacks(
    *, n: int, latency_s: float, concurrency: int, worker_counts: list[int],
    stacks: list[str], workdir: Path, run_id: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (stack, workers) row; the caller prints and stores them."""
    import secrets

    from devtools.llm_server import spawn_llm_server

    api_key = "sk-bench-" + secrets.token_hex(16)
    pdfs = generate_pdfs(n)
    rows: list[dict[str, Any]] = []
    with spawn_llm_server(latency_s=latency_s, jitter_s=latency_s * 0.1, api_key=api_key) as llm:
        for kind in stacks:
            with started(kind, workdir) as target, talking_to(target):
                s3 = S3Store(_s3_client(target), target.bucket)
                prepare(target, llm, api_key, concurrency)
                for workers in worker_counts:
                    tag = f"{run_id}-{kind}-w{workers}"
                    timeout_s = 300 + n * 2.0
                    rows.append(measure(target, s3, llm, pdfs, workers, tag, timeout_s))
    return rows


def print_rows(rows: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    table = Table(title="embedded vs production stack (deployment runs on process workers)")
    columns = ("stack", "workers", "n", "wall_s", "invoices_per_s",
               "orchestration_cpu_ms_per_invoice", "slot_wait_median_s", "slot_wait_p95_s",
               "slot_wait_max_s", "llm_requests", "states")  # fmt: skip
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column == "stack" else "right")
    for row in rows:
        done = sum(1 for state in row["states"] if state == "COMPLETED")
        shown = {**row, "states": f"{done}/{len(row['states'])} completed"}
        table.add_row(*(str(shown.get(c, "-")) for c in columns))
    console.print(table)


def stacks_ok(rows: list[dict[str, Any]]) -> bool:
    """Every run completed and every invoice reached the LLM exactly once."""
    return all(set(r["states"]) == {"COMPLETED"} and r["llm_requests"] == r["n"] for r in rows)
