"""Batch mode (issue 13 section 1) on real S3 (moto) and the loopback OpenAI server's
Files and Batches APIs, with no Prefect: submit -> collect -> done, crashes, failed
lines, expiry, concurrent collects, and batch + online runs over one prefix. Requests
are counted at the server (`by_key` counts online requests and batch lines alike)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from batch_support import (
    API_KEY,
    PRICE,
    batch_run,
    collect_run,
    entries,
    online_run,
    open_records,
    statuses,
    upload,
    wait_until,
)

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow.extractors.openai_batch import BatchLimits, split
from invoiceflow.manifest import Status
from invoiceflow.results import write_result
from invoiceflow.samples import generate_corpus
from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import S3Store

pytestmark = pytest.mark.batch


@pytest.fixture(scope="module")
def llm_server() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


@pytest.fixture
def llm(llm_server: LLMServerHandle) -> LLMServerHandle:
    llm_server.reset()
    return llm_server


async def test_submit_then_collect_records_done_at_batch_prices(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 5, hybrid=True)
    outcomes, batch_ids = await batch_run(s3_store, unique_prefix, llm, batch_max_requests=2)

    # The e-invoice took its fast path; the rest went out in 3 batches of <= 2 requests.
    by_key = {o.key: o for o in outcomes}
    assert by_key[f"{unique_prefix}hybrid.pdf"].status is Status.done
    assert all(by_key[k].status is Status.submitted and by_key[k].recorded for k in keys)
    assert len(batch_ids) == 3
    submitted = entries(s3_store, unique_prefix)
    assert {submitted[k]["batch_id"] for k in keys} == set(batch_ids)
    assert all(submitted[k]["status"] == "submitted" for k in keys)
    stats = llm.stats()
    assert (stats["batches"], stats["batch_lines"], stats["total"]) == (3, 5, 5)
    assert len(open_records(s3_store, unique_prefix)) == 3

    # A submitted invoice is claimable by nobody: a new run claims nothing.
    assert await online_run(s3_store, unique_prefix, llm) == []

    report = await collect_run(s3_store, unique_prefix, llm)
    assert sorted(report.collected_batches) == sorted(batch_ids) and not report.open_batches
    final = entries(s3_store, unique_prefix)
    assert all(final[k]["status"] == "done" for k in [*keys, f"{unique_prefix}hybrid.pdf"])
    assert open_records(s3_store, unique_prefix) == []
    for key in keys:
        result = ExtractionResult.model_validate_json(s3_store.get(final[key]["result_key"]).body)
        assert result.source == "llm" and result.usage is not None
        assert result.cost == PRICE.cost(result.usage, batch=True)
        assert result.cost < PRICE.cost(result.usage)  # half price
        assert final[key]["cost"] == str(result.cost)
        assert final[key]["tokens_cached"] == result.usage.cached_tokens
    # The static prompt prefix is cached across batch lines too.
    assert sum(final[k]["tokens_cached"] > 0 for k in keys) == 4
    # Each invoice was requested exactly once, and collecting again asks nothing.
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)
    again = await collect_run(s3_store, unique_prefix, llm)
    assert again.outcomes == [] and llm.stats()["total"] == 5


def test_split_respects_requests_and_bytes() -> None:
    lines = [(f"id{n}", b"x" * 10) for n in range(7)]
    assert [len(b) for b in split(lines, BatchLimits(max_requests=3))] == [3, 3, 1]
    assert [len(b) for b in split(lines, BatchLimits(max_bytes=25))] == [2, 2, 2, 1]
    assert [len(b) for b in split(lines, BatchLimits(max_bytes=5))] == [1] * 7
    # A provider minimum evens the last batch out when the one before can spare lines.
    evened = split(lines, BatchLimits(max_requests=5, min_requests=3))
    assert [len(b) for b in evened] == [4, 3]
    assert [line for batch in evened for line in batch] == lines  # file order kept
    assert [len(b) for b in split(lines, BatchLimits(max_requests=6, min_requests=2))] == [5, 2]
    too_few = split(lines, BatchLimits(max_requests=3, min_requests=3))
    assert [len(b) for b in too_few] == [3, 3, 1]  # the last one goes online


async def test_byte_limit_splits_the_input_file(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    upload(s3_store, unique_prefix, 3)
    # Every line is several KB (the static prompt alone is ~4.5 KB): one per file.
    _, batch_ids = await batch_run(s3_store, unique_prefix, llm, batch_max_bytes=6000)
    assert len(batch_ids) == 3 and llm.stats()["batch_lines"] == 3


async def test_an_unfinished_batch_stays_submitted(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 2)
    llm.configure_batches(delay_s=3600)
    _, batch_ids = await batch_run(s3_store, unique_prefix, llm)
    report = await collect_run(s3_store, unique_prefix, llm)
    assert report.open_batches == batch_ids and report.outcomes == []
    assert set(statuses(s3_store, unique_prefix).values()) == {"submitted"}
    assert await online_run(s3_store, unique_prefix, llm) == []
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)


class LockThatDies:
    """A manifest lock that fails (a deleted Prefect limit) once `dead()` says so: here,
    once the first batch is recorded, however many commits that took."""

    def __init__(self, dead: Callable[[], bool]) -> None:
        self.dead = dead
        self.lock = asyncio.Lock()

    def __call__(self) -> Any:
        if self.dead():
            raise RuntimeError("the manifest lock is gone")
        return self.lock


async def test_a_collect_that_crashes_halfway_is_rerun_without_new_requests(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 6)
    await batch_run(s3_store, unique_prefix, llm, batch_max_requests=3)
    requests_after_submit = llm.stats()["total"]

    # The first collect records one batch, writes the other's results, then loses its
    # manifest lock before recording them.
    def first_batch_recorded() -> bool:
        return list(statuses(s3_store, unique_prefix).values()).count("done") >= 3

    with pytest.raises(RuntimeError, match="lock is gone"):
        await collect_run(s3_store, unique_prefix, llm, lock=LockThatDies(first_batch_recorded))
    half = sorted(statuses(s3_store, unique_prefix).values())
    assert half == ["done"] * 3 + ["submitted"] * 3
    assert len(open_records(s3_store, unique_prefix)) == 1

    report = await collect_run(s3_store, unique_prefix, llm, run_id="collect-2")
    assert set(statuses(s3_store, unique_prefix).values()) == {"done"}
    assert len(report.collected_batches) == 1
    assert open_records(s3_store, unique_prefix) == []
    # Results came from the batch output: nothing was asked again.
    assert llm.stats()["total"] == requests_after_submit
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)


async def test_failed_lines_are_transient_and_retried_by_the_next_run(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 4)
    failing = keys[:2]
    llm.configure_batches(fail=failing)
    await batch_run(s3_store, unique_prefix, llm)
    report = await collect_run(s3_store, unique_prefix, llm)
    assert len(report.collected_batches) == 1
    after = entries(s3_store, unique_prefix)
    for key in failing:
        assert after[key]["status"] == "failed" and after[key]["transient"] is True
        assert after[key]["error_kind"] == "batch_line_failed"
    assert all(after[k]["status"] == "done" for k in keys[2:])

    retried = await online_run(s3_store, unique_prefix, llm)
    assert sorted(o.key for o in retried) == sorted(failing)
    assert all(o.status is Status.done for o in retried)
    by_key = llm.stats()["by_key"]
    assert {k: by_key[k] for k in failing} == dict.fromkeys(failing, 2)  # batch + online
    assert {k: by_key[k] for k in keys[2:]} == dict.fromkeys(keys[2:], 1)


async def test_an_expired_batch_releases_its_invoices(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 3)
    llm.configure_batches(expire=True)
    await batch_run(s3_store, unique_prefix, llm)
    report = await collect_run(s3_store, unique_prefix, llm)
    assert len(report.collected_batches) == 1 and open_records(s3_store, unique_prefix) == []
    expired = entries(s3_store, unique_prefix)
    assert {expired[k]["error_kind"] for k in keys} == {"batch_expired"}
    assert all(expired[k]["status"] == "failed" and expired[k]["transient"] for k in keys)
    # Released: the next batch run claims and submits them again.
    llm.configure_batches(expire=False)
    outcomes, _ = await batch_run(s3_store, unique_prefix, llm, run_id="batch-2")
    assert sorted(o.key for o in outcomes) == sorted(keys)
    await collect_run(s3_store, unique_prefix, llm)
    assert set(statuses(s3_store, unique_prefix).values()) == {"done"}


async def test_two_collect_runs_at_once_record_each_invoice_once(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 6)
    await batch_run(s3_store, unique_prefix, llm, batch_max_requests=3)
    shared = asyncio.Lock()  # one manifest lock, as the Prefect limit is

    first, second = await asyncio.gather(
        collect_run(s3_store, unique_prefix, llm, "collect-a", lambda: shared),
        collect_run(s3_store, unique_prefix, llm, "collect-b", lambda: shared),
    )
    recorded = [o for o in [*first.outcomes, *second.outcomes] if o.recorded]
    assert sorted(o.key for o in recorded) == sorted(keys)  # each exactly once
    assert set(statuses(s3_store, unique_prefix).values()) == {"done"}
    assert open_records(s3_store, unique_prefix) == []
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)


async def test_a_slower_collect_never_rewrites_a_result_the_other_recorded(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    (_, pdf, _), *_ = generate_corpus(1, seed=31)
    keys = [f"{unique_prefix}a.pdf", f"{unique_prefix}b.pdf"]  # one is the other's twin
    for key in keys:
        s3_store.put(key, pdf, content_type="application/pdf")
    await batch_run(s3_store, unique_prefix, llm)
    shared = asyncio.Lock()  # one manifest lock, as the Prefect limit is

    # The slow collect has read the manifest (both lines wait) and is downloading the
    # output when the fast one records both, the twin marked as a duplicate.
    llm.configure_batches(slow_downloads=1, slow_download_s=60)
    slow = asyncio.create_task(
        collect_run(s3_store, unique_prefix, llm, "collect-slow", lambda: shared)
    )
    await wait_until(lambda: llm.stats()["downloads"] == 1, 30, "the slow download started")
    await collect_run(s3_store, unique_prefix, llm, "collect-fast", lambda: shared)
    recorded = entries(s3_store, unique_prefix)
    written = {k: s3_store.get(recorded[k]["result_key"]) for k in keys}
    llm.configure_batches(slow_download_s=0)  # the slow collect goes on
    await slow

    assert entries(s3_store, unique_prefix) == recorded
    assert {k: s3_store.get(recorded[k]["result_key"]) for k in keys} == written
    (twin,) = [k for k in keys if recorded[k].get("duplicate_of")]
    result = ExtractionResult.model_validate_json(written[twin].body)
    assert result.duplicate_of == recorded[twin]["duplicate_of"] and result.needs_review
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)


def test_a_result_is_written_once_per_answer(s3_store: S3Store) -> None:
    key = "results/inv.json"
    answer = ExtractionResult.model_validate(
        {
            "source_key": "in/inv.pdf",
            "source_etag": "e1",
            "extractor": "openai",
            "pages": 1,
            "invoice": {"invoice_number": "R-1", "total": "10.00"},
            "extracted_at": "2026-01-01T00:00:00Z",
        }
    )
    write_result(s3_store, key, answer)
    created = s3_store.get(key)
    # The same answer again (later, by another writer): left alone.
    write_result(s3_store, key, answer.model_copy(update={"extracted_at": dt.datetime.now(dt.UTC)}))
    assert s3_store.get(key) == created
    # Its duplicate mark is written; the unmarked answer then leaves the mark alone.
    marked = answer.model_copy(
        update={"duplicate_of": "in/twin.pdf", "needs_review": True, "review_reasons": ["dup"]}
    )
    write_result(s3_store, key, marked)
    assert ExtractionResult.model_validate_json(s3_store.get(key).body) == marked
    write_result(s3_store, key, answer)
    assert ExtractionResult.model_validate_json(s3_store.get(key).body) == marked
    # Another answer (a new source version, or selection="all") replaces it.
    newer = answer.model_copy(update={"source_etag": "e2"})
    write_result(s3_store, key, newer)
    assert ExtractionResult.model_validate_json(s3_store.get(key).body) == newer


async def test_batch_and_online_runs_over_one_prefix_request_no_invoice_twice(
    s3_store: S3Store, unique_prefix: str, llm: LLMServerHandle
) -> None:
    keys = upload(s3_store, unique_prefix, 12)
    llm.configure(latency_s=0.05)
    (batch_outcomes, _), online_outcomes = await asyncio.gather(
        batch_run(s3_store, unique_prefix, llm), online_run(s3_store, unique_prefix, llm)
    )
    await collect_run(s3_store, unique_prefix, llm)

    took = [o.key for o in [*batch_outcomes, *online_outcomes] if o.recorded]
    assert sorted(took) == sorted(keys)  # the claims split the prefix between them
    assert set(statuses(s3_store, unique_prefix).values()) == {"done"}
    assert llm.stats()["by_key"] == dict.fromkeys(keys, 1)
