"""Operating invoiceflow the Prefect way, against the session's real Prefect server.

Deployments come from the repository's prefect.yaml through `invoiceflow deploy`
(= `make deploy`), runs are executed by `invoiceflow worker` (= `make worker`)
subprocesses, and a failed run is retried with the very API call the UI's Retry button
makes. The loopback LLM server counts requests per invoice, which is what proves that
a retry bills nobody twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from support import (
    OUTPUT_DIR,
    PROCESS_INVOICES,
    REPO_ROOT,
    REPROCESS_FAILED,
    WORK_POOL,
    Worker,
    artifacts_of,
    client,
    create_run,
    deploy_prefect_file,
    deploy_with_cli,
    direct_s3,
    fail_llm_for,
    manifest_entries,
    pause_schedules,
    retry_like_the_ui,
    running_worker,
    runs_of,
    save_llm_block,
    unique,
    upload_invoices,
    wait_for_final_state,
)

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow import stack
from invoiceflow.storage import S3Store

pytestmark = pytest.mark.ops

API_KEY = "sk-test-ops-" + uuid.uuid4().hex
LOGS = OUTPUT_DIR / "ops"


@pytest.fixture(scope="module")
def s3(local_stack: stack.StackInfo) -> S3Store:
    return direct_s3(local_stack.s3_endpoint, local_stack.bucket)


@pytest.fixture(scope="module")
def deployed(local_stack: stack.StackInfo) -> dict[str, Any]:
    """`invoiceflow deploy` onto the session's server, hourly schedule then paused."""
    deploy_with_cli(LOGS / "deploy.log")
    with client() as c:
        deployments = {
            name: c.read_deployment_by_name(name) for name in (PROCESS_INVOICES, REPROCESS_FAILED)
        }
    # As deployed, before the pause below.
    schedules = {name: [s.schedule for s in d.schedules] for name, d in deployments.items()}
    pause_schedules(deployments[PROCESS_INVOICES].id)
    with client() as c:  # collect-batches' 10-minute schedule would also feed the worker
        pause_schedules(c.read_deployment_by_name("collect-batches/collect-batches").id)
    return {"deployments": deployments, "schedules": schedules}


@pytest.fixture(scope="module")
def worker(deployed: dict[str, Any]) -> Iterator[Worker]:
    with running_worker(LOGS / "worker.log", limit=2) as w:
        yield w


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


def run_params(prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "source_prefix": prefix,
        "manifest_key": f"manifests/{prefix.rstrip('/')}.json",
        "results_prefix": f"results/{prefix}",
        "commit_interval_s": 0.2,
        **extra,
    }


def test_prefect_yaml_deploys_both_deployments(deployed: dict[str, Any]) -> None:
    process = deployed["deployments"][PROCESS_INVOICES]
    reprocess = deployed["deployments"][REPROCESS_FAILED]
    (hourly,) = deployed["schedules"][PROCESS_INVOICES]
    assert isinstance(hourly, CronSchedule)
    assert (hourly.cron, hourly.timezone) == ("0 * * * *", "Europe/Berlin")
    assert deployed["schedules"][REPROCESS_FAILED] == []

    for deployment in (process, reprocess):
        assert deployment.work_pool_name == WORK_POOL
        assert deployment.entrypoint == "flows/process_invoices.py:process_invoices"
        # The flow code is this checkout: each run starts in the repository root.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
        ]
        # The run form is the documented pydantic model.
        form = deployment.parameter_openapi_schema
        assert "params" in form["properties"]
    assert process.global_concurrency_limit is not None
    assert process.global_concurrency_limit.limit == 4
    assert process.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert reprocess.global_concurrency_limit.limit == 1
    assert process.parameters["params"]["selection"] == "new"
    assert reprocess.parameters["params"]["selection"] == "new"
    assert reprocess.parameters["params"]["max_llm_concurrency"] == 4

    with client() as c:
        pool = c.read_work_pool(WORK_POOL)
        lock = c.read_global_concurrency_limit_by_name("invoiceflow-manifest")
    assert pool.type == "process"
    assert (lock.limit, lock.active) == (1, True)


def test_worker_runs_a_deployment_run_with_artifacts(
    deployed: dict[str, Any], worker: Worker, s3: S3Store
) -> None:
    prefix = unique("ops-run") + "/"
    keys = upload_invoices(s3, prefix, 5)
    params = run_params(prefix)
    flow_run = create_run(PROCESS_INVOICES, params)

    finished = wait_for_final_state(flow_run.id, worker)

    assert finished.state.type == StateType.COMPLETED, finished.state.message
    entries = manifest_entries(s3, params["manifest_key"])
    assert {k: e["status"] for k, e in entries.items()} == dict.fromkeys(keys, "done")
    artifacts = artifacts_of(flow_run.id)
    progress = artifacts["invoiceflow-progress"]
    assert progress.type == "progress"
    assert float(progress.data) == 100.0
    assert progress.description == "5 of 5 invoices finished"
    table = artifacts["invoices"]
    rows = table.data if isinstance(table.data, list) else yaml.safe_load(table.data)
    assert sorted(row["invoice"] for row in rows) == sorted(keys)
    assert set(rows[0]) >= {
        "invoice", "status", "vendor", "total", "currency", "needs_review", "tokens", "cost",
    }  # fmt: skip
    assert "- done: **5**" in artifacts["run-summary"].data


def test_retry_through_the_api_does_not_rebill(
    deployed: dict[str, Any], worker: Worker, s3: S3Store, llm: LLMServerHandle
) -> None:
    prefix = unique("ops-retry") + "/"
    keys = upload_invoices(s3, prefix, 6, seed=12)
    faulty = keys[1:3]
    block = save_llm_block(llm.base_url, API_KEY, timeout_s=30, max_retries=0)
    params = run_params(prefix, extractor_block=block, max_llm_concurrency=4)
    llm.reset()
    llm.set_faults(fail_llm_for(faulty))

    flow_run = create_run(PROCESS_INVOICES, params)
    failed = wait_for_final_state(flow_run.id, worker)

    assert failed.state.type == StateType.FAILED, failed.state.message
    assert "2 of 6 invoices failed" in failed.state.message
    before = llm.stats()["by_key"]
    done_before = [k for k in keys if k not in faulty]
    assert {k: before.get(k) for k in done_before} == dict.fromkeys(done_before, 1)
    assert all(before.get(k, 0) >= 1 for k in faulty)
    entries = manifest_entries(s3, params["manifest_key"])
    assert {k for k, e in entries.items() if e["status"] == "failed"} == set(faulty)
    assert all(entries[k].get("transient") for k in faulty)

    llm.set_faults([])
    retry_like_the_ui(flow_run.id)
    retried = wait_for_final_state(flow_run.id, worker)

    assert retried.state.type == StateType.COMPLETED, retried.state.message
    assert retried.run_count == 2
    after = llm.stats()["by_key"]
    # No invoice that was done before the retry reached the LLM again...
    assert {k: after.get(k) for k in done_before} == {k: before[k] for k in done_before}
    # ...and each failed one exactly once more.
    assert {k: after[k] - before[k] for k in faulty} == dict.fromkeys(faulty, 1)
    entries = manifest_entries(s3, params["manifest_key"])
    assert {k: e["status"] for k, e in entries.items()} == dict.fromkeys(keys, "done")
    assert API_KEY not in s3.get(params["manifest_key"]).body.decode()


def test_reprocess_failed_takes_only_transient_failures(
    deployed: dict[str, Any], worker: Worker, s3: S3Store, llm: LLMServerHandle
) -> None:
    """The manual deployment re-runs transient failures, not done or permanent ones."""
    prefix = unique("ops-reprocess") + "/"
    keys = upload_invoices(s3, prefix, 4, seed=13)
    broken = f"{prefix}not-a-pdf.pdf"
    s3.put(broken, b"this is not a PDF", content_type="application/pdf")
    block = save_llm_block(llm.base_url, API_KEY, timeout_s=30, max_retries=0)
    params = run_params(prefix, extractor_block=block)
    llm.reset()
    llm.set_faults(fail_llm_for(keys[:1]))
    first = wait_for_final_state(create_run(PROCESS_INVOICES, params).id, worker)
    assert first.state.type == StateType.FAILED
    assert "2 of 5 invoices failed" in first.state.message
    llm.set_faults([])
    before = llm.stats()["by_key"]

    # Like the UI's run form: the deployment's parameters with this run's locations.
    defaults = deployed["deployments"][REPROCESS_FAILED].parameters["params"]
    second_run = create_run(REPROCESS_FAILED, {**defaults, **params})
    second = wait_for_final_state(second_run.id, worker)

    # It processed the transient failure only, so it completed.
    assert second.state.type == StateType.COMPLETED, second.state.message
    after = llm.stats()["by_key"]
    assert {k: after.get(k, 0) - before.get(k, 0) for k in keys} == {
        keys[0]: 1, keys[1]: 0, keys[2]: 0, keys[3]: 0,
    }  # fmt: skip
    entries = manifest_entries(s3, params["manifest_key"])
    assert entries[keys[0]]["status"] == "done"
    assert (entries[broken]["status"], entries[broken]["attempts"]) == ("failed", 1)


def test_schedule_creates_runs_that_a_worker_executes(
    local_stack: stack.StackInfo, deployed: dict[str, Any], s3: S3Store, tmp_path: Path
) -> None:
    """prefect.yaml's process-invoices with a 10 s interval, on a pool of its own."""
    from flows.deploy import ensure_work_pool

    pool = unique("invoices-schedule")
    asyncio.run(ensure_work_pool(pool))
    prefix = unique("ops-schedule") + "/"
    keys = upload_invoices(s3, prefix, 2, seed=14)
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in config["deployments"] if d["name"] == "process-invoices"]
    deployment.update(
        name="every-10-seconds",
        work_pool={**deployment["work_pool"], "name": pool},
        schedules=[{"interval": 10, "timezone": "Europe/Berlin"}],
        parameters={"params": run_params(prefix)},
    )
    config["deployments"] = [deployment]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))

    deploy_prefect_file(prefect_file, LOGS / "deploy-schedule.log")
    with client() as c:
        scheduled = c.read_deployment_by_name("process-invoices/every-10-seconds")
    try:
        (schedule,) = scheduled.schedules
        assert isinstance(schedule.schedule, IntervalSchedule)
        assert schedule.schedule.interval.total_seconds() == 10

        # The server's scheduler creates the runs; nobody asked for one.
        runs = _wait_for(lambda: [r for r in runs_of(scheduled.id) if r.auto_scheduled], 2)
        assert all(r.state.type == StateType.SCHEDULED for r in runs)
        with running_worker(LOGS / "worker-schedule.log", pool=pool) as w:
            completed = _wait_for(
                lambda: [
                    r
                    for r in runs_of(scheduled.id)
                    if r.state is not None and r.state.type == StateType.COMPLETED
                ],
                1,
                worker=w,
            )
        assert completed[0].auto_scheduled
        entries = manifest_entries(s3, f"manifests/{prefix.rstrip('/')}.json")
        assert {k: e["status"] for k, e in entries.items()} == dict.fromkeys(keys, "done")
    finally:
        with client() as c:
            c.delete_deployment(scheduled.id)


def _wait_for(
    find: Any, at_least: int, worker: Worker | None = None, timeout_s: float = 300
) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = find()
        if len(found) >= at_least:
            return found
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker died:\n{worker.tail()}")
        if time.monotonic() > deadline:
            detail = worker.tail() if worker is not None else ""
            raise AssertionError(f"found {len(found)} of {at_least} within {timeout_s}s\n{detail}")
        time.sleep(1)
