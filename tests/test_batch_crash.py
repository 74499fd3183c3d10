"""A batch run killed while it submits, or whose create fails (issue 13, hardening):
nothing the provider accepted is ever requested again, and what it never got is
released.

The run is a child process (`batch_support.start_batch_run`) killed with SIGKILL while
the loopback server holds its answer: after the provider accepted the batch (its lines
are counted, so it is billed) and before the run learnt the batch id; or while a file
upload is answered, before any batch exists. Then Prefect would report the run as
crashed (`ended`): a new run and a collect follow, and the requests of every invoice
are counted at the server. The failed creates are scripted at the server too: a 502
after the batch was created, a 400 refusal, a 503 that created nothing."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from batch_support import (
    API_KEY,
    batch_run,
    collect_run,
    ended,
    entries,
    online_run,
    open_records,
    start_batch_run,
    statuses,
    upload,
    wait_until,
)

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow.manifest import Status
from invoiceflow.storage import S3Store

pytestmark = pytest.mark.batch

KILLED = "killed-batch-run"


@pytest.fixture(scope="module")
def llm_server() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


@pytest.fixture
def llm(llm_server: LLMServerHandle) -> LLMServerHandle:
    llm_server.reset()
    return llm_server


async def kill_when(
    proc: subprocess.Popen[bytes], llm: LLMServerHandle, stat: str, value: int
) -> None:
    try:
        await wait_until(lambda: llm.stats()[stat] >= value, 60, f"server stat {stat} >= {value}")
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_run_killed_after_the_provider_accepted_its_batch_bills_it_once(
    s3_store: S3Store, s3_endpoint: str, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 3)
    llm.configure_batches(stall_create_s=120)
    child = start_batch_run(
        "openai", s3_endpoint, s3_store.bucket, unique_prefix, llm.base_url, KILLED
    )
    await kill_when(child, llm, "batches", 1)  # accepted, and the run never heard back
    llm.configure_batches(stall_create_s=0)
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)

    # Prefect reports the killed run as crashed. A new run asks for none of its
    # invoices again, and the collect finds the accepted batch and records it.
    assert await online_run(s3_store, unique_prefix, llm, runs=ended(KILLED)) == []
    report = await collect_run(s3_store, unique_prefix, llm, runs=ended(KILLED))
    assert len(report.collected_batches) == 1
    final = entries(s3_store, unique_prefix)
    assert {final[k]["status"] for k in keys} == {"done"}
    assert {final[k]["batch_id"] for k in keys} == set(report.collected_batches)
    assert open_records(s3_store, unique_prefix) == []
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)
    assert llm.stats()["batches"] == 1


async def test_a_run_killed_before_the_provider_got_its_batch_releases_the_invoices(
    s3_store: S3Store, s3_endpoint: str, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 3)
    llm.configure_batches(stall_upload_s=120)
    child = start_batch_run(
        "openai", s3_endpoint, s3_store.bucket, unique_prefix, llm.base_url, KILLED
    )
    await kill_when(child, llm, "files", 1)  # the input file arrived; no batch exists
    llm.configure_batches(stall_upload_s=0)
    assert llm.stats()["batches"] == 0 and llm.stats()["by_key"] == {}

    # The collect finds no batch for the dead run's submission and releases its
    # invoices; the next run sends each of them once.
    await collect_run(s3_store, unique_prefix, llm, runs=ended(KILLED))
    assert open_records(s3_store, unique_prefix) == []
    retried = await online_run(s3_store, unique_prefix, llm, runs=ended(KILLED))
    assert sorted(o.key for o in retried if o.recorded) == sorted(keys)
    assert set(statuses(s3_store, unique_prefix).values()) == {"done"}
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)


async def test_a_create_answered_with_an_error_after_the_batch_was_accepted_is_adopted(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 2)
    # A gateway's 502 for a create the provider did carry out: neither a blind retry
    # (a second, billed batch) nor a release (the invoices sent again next run).
    llm.configure_batches(create_failures=[{"status": 502, "accepted": True}])
    outcomes, batch_ids = await batch_run(s3_store, unique_prefix, llm)
    assert {o.status for o in outcomes} == {Status.submitted} and len(batch_ids) == 1
    assert {e["batch_id"] for e in entries(s3_store, unique_prefix).values()} == set(batch_ids)
    await collect_run(s3_store, unique_prefix, llm)
    assert set(statuses(s3_store, unique_prefix).values()) == {"done"}
    assert llm.stats()["batches"] == 1
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)


async def test_a_refused_create_releases_the_invoices_for_the_next_run(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 2)
    llm.configure_batches(create_failures=[{"status": 400, "accepted": False}])
    outcomes, _ = await batch_run(s3_store, unique_prefix, llm)
    assert {(o.status, o.error_kind, o.transient) for o in outcomes} == {
        (Status.failed, "batch_refused", True)
    }
    assert open_records(s3_store, unique_prefix) == []
    retried = await online_run(s3_store, unique_prefix, llm)
    assert sorted(o.key for o in retried if o.recorded) == sorted(keys)
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)


async def test_a_create_with_an_unknown_outcome_is_settled_by_collect(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 2)
    # A 503: the provider may or may not have created the batch (here it did not).
    llm.configure_batches(create_failures=[{"status": 503, "accepted": False}])
    outcomes, _ = await batch_run(s3_store, unique_prefix, llm, run_id="unsure-run")
    assert {o.status for o in outcomes} == {Status.submitted}
    # Nobody sends them while the run that may have created the batch lives...
    assert await online_run(s3_store, unique_prefix, llm) == []
    report = await collect_run(s3_store, unique_prefix, llm)
    assert len(report.open_batches) == 1 and report.outcomes == []
    # ...and once it has ended, the collect releases them: the next run sends each once.
    await collect_run(s3_store, unique_prefix, llm, runs=ended("unsure-run"))
    retried = await online_run(s3_store, unique_prefix, llm)
    assert sorted(o.key for o in retried if o.recorded) == sorted(keys)
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)
