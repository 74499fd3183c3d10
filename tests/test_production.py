"""invoiceflow on Prefect's production stack, started here on loopback by the tests:
Postgres, Redis, 2 API replicas (`--no-services`) + a services process, haproxy (TLS,
round robin, basic auth), moto S3, 3 process workers, the loopback LLM.

`make test` runs these at INVOICEFLOW_PRODUCTION_INVOICES=90 (default), `make
test-production` at 600. The LLM server counts requests per invoice key, which is what
"processed exactly once" is measured against; manifest entries, result objects and
every concurrency limit's slots are checked after each scenario, faults included.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_URL,
    temporary_settings,
)
from production_support import (
    INVOICES,
    assert_completed,
    assert_exactly_once,
    assert_no_slot_taken,
    cli,
    deployment_slots,
    finished_task_runs,
    start_runs,
    start_workers,
    upload_batch,
    wait_all,
    wait_for_share,
    wait_until,
)
from support import (
    OUTPUT_DIR,
    PROCESS_INVOICES,
    REPO_ROOT,
    client,
    direct_s3,
    manifest_entries,
    pause_schedules,
    save_llm_block,
    wait_for_final_state,
)

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow import prodstack
from invoiceflow.storage import S3Store

API_KEY = "sk-test-prod-" + uuid.uuid4().hex
LOGS = OUTPUT_DIR / "production"
RUNS_TIMEOUT_S = 240 + INVOICES * 1.5
# The stack's start (~1-2 min on a loaded machine) counts against the first test.
pytestmark = [pytest.mark.production, pytest.mark.timeout(int(600 + 2 * RUNS_TIMEOUT_S))]


@pytest.fixture(scope="module")
def prod() -> Iterator[prodstack.ProductionStack]:
    state = Path(tempfile.mkdtemp(prefix="invoiceflow-prod-test-"))
    info, _ = prodstack.up_production(state, replicas=2, die_with_caller=True)
    settings = {
        PREFECT_API_URL: info.api_url,
        PREFECT_API_AUTH_STRING: info.auth_string,
        PREFECT_API_SSL_CERT_FILE: str(info.ca_file),
    }
    try:
        with temporary_settings(updates=settings):
            yield info
    finally:
        prodstack.down_production(state)
        if LOGS.parent.exists():
            shutil.copytree(state / "logs", LOGS / "stack-logs", dirs_exist_ok=True)
        prodstack.purge(state)


@pytest.fixture(scope="module")
def s3(prod: prodstack.ProductionStack) -> S3Store:
    return direct_s3(prod.s3_endpoint, prod.bucket)


@pytest.fixture(scope="module")
def deployed(prod: prodstack.ProductionStack) -> dict[str, Any]:
    """`invoiceflow provision` + `invoiceflow deploy`, as an operator runs them."""
    env = prod.env()
    # No --store-keys: workers and flow runs sign with their environment's credentials.
    cli(["provision", "--bucket", prod.bucket, "--endpoint-url", prod.s3_endpoint,
         "--create-bucket"], env, LOGS / "provision.log")  # fmt: skip
    cli(["deploy"], env, LOGS / "deploy.log")
    with client() as c:
        deployment = c.read_deployment_by_name(PROCESS_INVOICES)
    pause_schedules(deployment.id)
    return {"deployment": deployment}


@pytest.fixture(scope="module")
def llm(prod: prodstack.ProductionStack) -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY, latency_s=0.3, jitter_s=0.1) as handle:
        # No SDK retries: every request the LLM counts is one billed attempt.
        save_llm_block(handle.base_url, API_KEY, name="prod-llm", timeout_s=30, max_retries=0)
        yield handle


@pytest.fixture(scope="module")
def workers(prod: prodstack.ProductionStack, deployed: dict[str, Any]) -> list[str]:
    """3 process workers taking 2 runs each; stopped with the stack."""
    return start_workers(prod, 3, limit=2)


def test_deploy_on_a_bare_server_refuses_before_creating_anything(
    prod: prodstack.ProductionStack,
) -> None:
    """No bucket block yet: `invoiceflow deploy` says so and leaves no work pool behind."""
    from prefect.exceptions import ObjectNotFound

    failed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy"], cwd=REPO_ROOT,
        env={**os.environ, **prod.env()}, capture_output=True, text=True,
    )  # fmt: skip

    assert failed.returncode == 1
    assert "nothing was created" in failed.stderr.replace("\n", " ")
    with client() as c, pytest.raises(ObjectNotFound):
        c.read_work_pool("invoices")


def test_provision_is_idempotent_and_stores_no_keys_unless_asked(
    prod: prodstack.ProductionStack, deployed: dict[str, Any]
) -> None:
    from prefect_aws import AwsCredentials

    again = cli(["provision", "--bucket", prod.bucket, "--endpoint-url", prod.s3_endpoint,
                 "--create-bucket"], prod.env(), LOGS / "provision-again.log")  # fmt: skip

    assert "ok      manifest lock 'invoiceflow-manifest'" in again
    assert "ok      extractor block" in again
    assert f"ok      bucket s3://{prod.bucket}" in again
    credentials = AwsCredentials.load("invoiceflow-aws", _sync=True)
    assert credentials.aws_access_key_id is None
    assert credentials.aws_secret_access_key is None
    assert credentials.aws_client_parameters.endpoint_url == prod.s3_endpoint


def test_unauthenticated_clients_get_401_from_every_replica(
    prod: prodstack.ProductionStack, deployed: dict[str, Any]
) -> None:
    block = "/block_types/slug/aws-credentials/block_documents/name/invoiceflow-aws"
    urls = [prod.replica_url(i) for i in range(len(prod.replica_ports))] + [prod.api_url]
    for url in urls:
        with httpx.Client(verify=_trusting(prod), timeout=10) as http:
            assert http.get(f"{url}/health").status_code == 200  # probes stay open
            assert http.get(f"{url}{block}", params={"include_secrets": True}).status_code == 401
            assert http.post(f"{url}/flow_runs/filter", json={}).status_code == 401
            wrong = http.get(f"{url}{block}", auth=("invoiceflow", "wrong"))
            assert wrong.status_code == 401
    user, password = prod.auth_string.split(":", 1)
    with httpx.Client(verify=_trusting(prod), auth=(user, password)) as http:
        allowed = http.get(f"{prod.api_url}{block}", params={"include_secrets": True})
    assert allowed.status_code == 200
    # TLS at haproxy: an unverified certificate, or plain HTTP, gets nowhere.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{prod.api_url}/health", timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{prod.lb_port}/api/health", timeout=10).raise_for_status()


def _trusting(prod: prodstack.ProductionStack) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(prod.ca_file))


def test_six_runs_over_overlapping_prefixes_process_each_invoice_once(
    prod: prodstack.ProductionStack,
    deployed: dict[str, Any],
    workers: list[str],
    llm: LLMServerHandle,
    s3: S3Store,
) -> None:
    batch = upload_batch(s3, "scale", INVOICES)
    runs = wait_all(start_runs(batch, 6), RUNS_TIMEOUT_S)

    assert_completed(runs)
    assert_exactly_once(s3, llm, batch)
    assert_no_slot_taken()
    assert deployment_slots(deployed["deployment"].id) == 0
    logs = [Path(prod.state_dir, "logs", f"{w}.log").read_text() for w in workers]
    took = [sum(str(r.id) in log for r in runs) for log in logs]
    assert sum(1 for n in took if n) >= 2, f"runs per worker: {took}"


def test_replica_killed_mid_run_runs_finish_through_the_other(
    prod: prodstack.ProductionStack,
    deployed: dict[str, Any],
    workers: list[str],
    llm: LLMServerHandle,
    s3: S3Store,
) -> None:
    batch = upload_batch(s3, "replica-killed", max(30, INVOICES // 2))
    runs = start_runs(batch, 3)
    wait_for_share(llm, batch.keys, 0.25, RUNS_TIMEOUT_S)
    prodstack.stop_process(prod, "api-1", sig_kill=True)
    try:
        runs = wait_all(runs, RUNS_TIMEOUT_S)
    finally:  # back in the pool while the next test runs
        prodstack.restart_replicas(prod, die_with_caller=True, wait=False)

    assert_completed(runs)
    assert_exactly_once(s3, llm, batch)
    assert_no_slot_taken()
    assert deployment_slots(deployed["deployment"].id) == 0


def test_redis_restarted_mid_run_loses_nothing_and_bills_nothing_twice(
    prod: prodstack.ProductionStack,
    deployed: dict[str, Any],
    workers: list[str],
    llm: LLMServerHandle,
    s3: S3Store,
) -> None:
    """Redis keeps its data in an append-only file (fsync every second), so a restart
    keeps the leases; clients reconnect. See README "Production deployment"."""
    batch = upload_batch(s3, "redis-restart", max(30, INVOICES // 2))
    runs = start_runs(batch, 3)
    wait_for_share(llm, batch.keys, 0.25, RUNS_TIMEOUT_S)
    prodstack.restart_redis(prod, die_with_caller=True)
    runs = wait_all(runs, RUNS_TIMEOUT_S)

    assert_completed(runs)
    assert_exactly_once(s3, llm, batch)
    # The services' consumers reconnected: task runs (recorded from Redis messages) of
    # every run that processed invoices arrive, those finished after the restart
    # included. (A run whose prefix the others had claimed has no task runs.)
    processed_by = {e["run_id"] for e in manifest_entries(s3, batch.manifest_key).values()}
    busy = [r for r in runs if str(r.id) in processed_by]
    assert busy
    wait_until(lambda: all(finished_task_runs(r.id) for r in busy), 60, "task runs recorded")
    assert_no_slot_taken()
    assert deployment_slots(deployed["deployment"].id) == 0


def test_start_up_check_reads_redis_lease_storage(prod: prodstack.ProductionStack) -> None:
    from flows.server_check import warn_about_lease_storage

    check = asyncio.run(warn_about_lease_storage())

    assert check is not None
    assert check.lease_storage == prodstack.LEASE_STORAGE
    assert check.messaging_broker == "prefect_redis.messaging"
    assert (check.renewals_lost, check.warning) == (None, None)


def test_git_clone_pull_step_runs_on_a_worker_without_the_checkout(
    prod: prodstack.ProductionStack,
    deployed: dict[str, Any],
    workers: list[str],
    llm: LLMServerHandle,
    s3: S3Store,
    tmp_path: Path,
) -> None:
    """`invoiceflow deploy --pull git --repo file://…`: a worker started in an empty
    directory elsewhere runs the flow from a clone of a bare repository."""
    bare = _bare_repository_of_this_checkout(tmp_path / "invoiceflow.git")
    for name in workers:
        prodstack.stop_process(prod, name)
    cli(["deploy", "--pull", "git", "--repo", f"file://{bare}", "--branch", "main"],
        prod.env(), LOGS / "deploy-git.log")  # fmt: skip
    elsewhere = tmp_path / "worker-home"
    elsewhere.mkdir()
    from production_support import worker_env

    from flows.deploy import worker_command

    prodstack.start_worker(
        prod, worker_command(limit=1), "worker-remote", die_with_caller=True,
        cwd=elsewhere, extra_env=worker_env(),
    )  # fmt: skip
    with client() as c:
        deployment = c.read_deployment_by_name(PROCESS_INVOICES)
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.git_clone": {"repository": f"file://{bare}", "branch": "main"}}
    ]
    batch = upload_batch(s3, "git-pull", 3)
    (run,) = start_runs(batch, 1)
    finished = wait_for_final_state(run.id, timeout_s=RUNS_TIMEOUT_S)

    assert_completed([finished])
    assert_exactly_once(s3, llm, batch)


def _bare_repository_of_this_checkout(bare: Path) -> Path:
    """A bare repository whose `main` is this checkout as it is now, uncommitted edits
    of tracked files included (`git stash create` makes that commit without touching
    the work tree)."""

    def git(*args: str, cwd: Path = REPO_ROOT) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    commit = git("stash", "create") or git("rev-parse", "HEAD")
    git("init", "--bare", "--quiet", str(bare))
    git("push", "--quiet", str(bare), f"{commit}:refs/heads/main")
    return bare


def test_start_up_check_warns_in_the_run_log_about_in_memory_leases(
    prod: prodstack.ProductionStack,
) -> None:
    from prefect import flow

    from flows.server_check import warn_about_lease_storage

    @flow(name="lease-check")
    async def lease_check() -> Any:
        return await warn_about_lease_storage()

    memory = "prefect.server.concurrency.lease_storage.memory"
    # Last in the module, so the replicas are not switched back (that would be a minute).
    prodstack.restart_replicas(prod, lease_storage=memory, die_with_caller=True)
    state = asyncio.run(lease_check(return_state=True))
    check = state.result()
    assert check.lease_storage == memory
    assert check.renewals_lost and check.warning
    assert "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE" in check.warning
    assert state.is_completed()  # it warns, it never refuses
    assert _wait_for_run_log(state.state_details.flow_run_id, "MISCONFIGURED")


def _wait_for_run_log(flow_run_id: Any, needle: str, timeout_s: float = 60) -> bool:
    import time

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with client() as c:
            logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        if any(needle in log.message for log in logs):
            return True
        time.sleep(1)
    return False
