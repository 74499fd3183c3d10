"""Shared by the ops and UI tests: deploy prefect.yaml, run workers, follow flow runs.

Everything talks to the session's real Prefect server (conftest's `local_stack`), the
way an operator would: `invoiceflow deploy` / `prefect deploy`, `prefect worker start`
in a subprocess, and the REST API for what the UI shows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import Artifact, FlowRun, StateType
from prefect.states import State
from pydantic import SecretStr

from invoiceflow.manifest import ManifestStore
from invoiceflow.samples import generate_corpus
from invoiceflow.storage import S3Store, make_s3_client

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO_ROOT / "test-output"
PROCESS_INVOICES = "process-invoices/process-invoices"
REPROCESS_FAILED = "process-invoices/reprocess-failed"
WORK_POOL = "invoices"
# Flow runs start in a fresh Python process on a loaded 2-core machine: be patient.
RUN_TIMEOUT_S = 300
FINAL_STATES = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def client() -> SyncPrefectClient:
    return get_client(sync_client=True)


def s3_store(s3_endpoint: str, bucket: str) -> S3Store:
    client_ = make_s3_client(
        endpoint_url=s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x"
    )
    return S3Store(client_, bucket)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def upload_invoices(s3: S3Store, prefix: str, n: int, seed: int = 11) -> list[str]:
    keys = []
    for stem, pdf, _truth in generate_corpus(n, seed=seed):
        key = f"{prefix}{stem}.pdf"
        s3.put(key, pdf, content_type="application/pdf")
        keys.append(key)
    return keys


def manifest_entries(s3: S3Store, key: str) -> dict[str, dict[str, Any]]:
    def no_writes() -> Any:
        raise AssertionError("tests only read the manifest")

    return ManifestStore(s3, key, lock=no_writes).read_sync().entries


def _run(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=env or dict(os.environ), stdout=out, stderr=out
        )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{log.read_text()[-4000:]}"


def deploy_with_cli(log: Path) -> None:
    """What `make deploy` runs once the stack is up: `invoiceflow deploy`."""
    _run([sys.executable, "-m", "flows.cli", "deploy"], log)


def deploy_prefect_file(prefect_file: Path, log: Path) -> None:
    """`prefect --no-prompt deploy --all` for another prefect.yaml, from the repo root."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    _run([*command, "--prefect-file", str(prefect_file)], log)


def pause_schedules(deployment_id: UUID) -> None:
    """Stop a deployment's schedules and drop the runs they already scheduled.

    The hourly schedule of the real prefect.yaml would otherwise hand a worker an extra
    run whenever a test happens to cross the top of the hour.
    """
    with client() as c:
        for schedule in c.read_deployment_schedules(deployment_id):
            c.update_deployment_schedule(deployment_id, schedule.id, active=False)
        # The recent-deployments scheduler may have been mid-pass: sweep once more.
        for run in scheduled_runs(c, deployment_id):
            c.delete_flow_run(run.id)


def scheduled_runs(c: SyncPrefectClient, deployment_id: UUID) -> list[FlowRun]:
    return c.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
    )


def runs_of(deployment_id: UUID) -> list[FlowRun]:
    with client() as c:
        return c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


class Worker:
    """`invoiceflow worker` as an operator starts it, in its own process group."""

    def __init__(self, log: Path, pool: str = WORK_POOL, limit: int = 1) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        env = {
            **os.environ,
            # Poll every second instead of every 10 s: tests wait for the worker.
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            # Flow-run processes log to the API; keep the worker's own output readable.
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        command = [sys.executable, "-m", "flows.cli", "worker", "--pool", pool]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*command, "--limit", str(limit)],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The worker shuts down on SIGINT (Ctrl-C); it ignores a plain SIGTERM.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        # Flow-run subprocesses share the group; none may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def running_worker(log: Path, pool: str = WORK_POOL, limit: int = 1) -> Iterator[Worker]:
    worker = Worker(log, pool=pool, limit=limit)
    try:
        yield worker
    finally:
        worker.stop()


def create_run(deployment_name: str, params: dict[str, Any]) -> FlowRun:
    """A flow run of the deployment, like `prefect deployment run` or the API would."""
    with client() as c:
        deployment = c.read_deployment_by_name(deployment_name)
        return c.create_flow_run_from_deployment(deployment.id, parameters={"params": params})


def find_run_by_name(deployment_id: UUID, name: str) -> FlowRun:
    with client() as c:
        runs = c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
        )
    assert len(runs) == 1, f"expected one flow run named {name!r}, found {len(runs)}"
    return runs[0]


def wait_for_final_state(
    flow_run_id: UUID, worker: Worker | None = None, timeout_s: float = RUN_TIMEOUT_S
) -> FlowRun:
    """Poll until the run is Completed/Failed/Crashed/Cancelled."""
    deadline = time.monotonic() + timeout_s
    with client() as c:
        while True:
            run = c.read_flow_run(flow_run_id)
            if run.state is not None and run.state.type in FINAL_STATES:
                return run
            if worker is not None and not worker.alive():
                raise AssertionError(f"the worker died:\n{worker.tail()}")
            if time.monotonic() > deadline:
                state = run.state.name if run.state else None
                detail = worker.tail() if worker is not None else ""
                raise AssertionError(
                    f"flow run {flow_run_id} still {state} after {timeout_s:.0f}s\n{detail}"
                )
            time.sleep(1)


def retry_like_the_ui(flow_run_id: UUID) -> None:
    """What the UI's Retry button sends (`retryFlowRun` in the UI bundle)."""
    with client() as c:
        result = c.set_flow_run_state(
            flow_run_id,
            State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"),
            force=False,
        )
    assert result.status.value == "ACCEPT", result


def artifacts_of(flow_run_id: UUID) -> dict[str, Artifact]:
    with client() as c:
        artifacts = c.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts if a.key}


def save_llm_extractor(base_url: str, api_key: str, name: str) -> str:
    """An OpenAI-kind extractor block on the loopback LLM, failing fast (no SDK retries)."""
    from blocks.extractor import ExtractorBlock

    ExtractorBlock(
        kind="openai",
        base_url=base_url,
        model="test-model",
        api_key=SecretStr(api_key),
        max_retries=0,
        timeout_s=30,
    ).save(name, overwrite=True, _sync=True)  # Playwright's sync API runs a loop
    return name


def fail_llm_for(keys: list[str]) -> list[dict[str, Any]]:
    """Fault rules: HTTP 500 for every request about these invoices, until cleared."""
    return [{"match": key, "status": 500, "times": -1} for key in keys]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
