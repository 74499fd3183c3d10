"""Fault cases for the manifest: claims of live runs, bad manifest data, colliding keys.

Each reproduces a break from issue 11 end to end through the flow, on the session's
real Prefect server, moto S3 and the loopback LLM server (which counts calls per
invoice by `X-Invoice-Key`), and ends with `assert_invariants` where the case finishes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from support import (
    assert_invariants,
    create_lock,
    direct_s3,
    done_keys,
    flow_params,
    good_invoices,
    list_keys,
    manifest_entries,
    run_flow,
    save_llm_block,
    unique,
    upload,
    wait_until,
)
from typer.testing import CliRunner

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow import stack
from invoiceflow.storage import S3Store

pytestmark = pytest.mark.faults

API_KEY = "sk-faults-manifest-" + "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def s3(local_stack: stack.StackInfo) -> S3Store:
    return direct_s3(local_stack.s3_endpoint, local_stack.bucket)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(latency_s=0.02, api_key=API_KEY) as handle:
        yield handle


async def test_a_second_run_never_takes_over_the_claims_of_a_live_run(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    """Issue 11 #2, scaled down: a claim timeout far shorter than the first run's queue.

    Before: pending claims were written once and never refreshed, so the second run
    took over every claim older than the timeout that the first had not reached yet,
    and both called the LLM for them (60 invoices, runs 30 s apart, 15 min timeout
    shortened: 80 calls, 20 invoices billed twice).
    """
    prefix = unique("live-claims") + "/"
    listed = upload(s3, prefix, good_invoices(60, seed=71))
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=save_llm_block(llm.base_url, API_KEY),
        max_llm_concurrency=2,
        claim_timeout_s=2.0,  # the first run's queue lasts ~10 s
    )
    llm.reset()
    llm.configure(latency_s=0.3, jitter_s=0.05)

    async def second_run() -> Any:
        await asyncio.sleep(4.0)  # the first run's claims are older than the timeout now
        return await run_flow(params)

    try:
        first, second = await asyncio.gather(run_flow(params), second_run())
    finally:
        llm.configure(latency_s=0.02, jitter_s=0.0)

    calls = llm.stats()["by_key"]
    print(
        f"live claims: {sum(calls.values())} LLM calls for {len(listed)} invoices; "
        f"first run processed {getattr(first, 'processed', first)}, "
        f"second {getattr(second, 'processed', second)}"
    )
    assert calls == {k: 1 for k in listed}, {k: n for k, n in calls.items() if n != 1}
    assert first.done + second.done == len(listed), (first, second)
    assert second.processed < len(listed) // 2, second  # it found them claimed
    report = assert_invariants(s3, params, listed)
    assert report.done == listed


MALFORMED_ELSEWHERE = {
    "a-string": "done",
    "an-int-invoice-number": {
        "status": "done",
        "source_etag": "e",
        "attempts": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "invoice_number": 4711,
        "vendor_name": "ACME",
    },
}


async def test_malformed_entries_under_another_prefix_break_no_run(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    """Before: one malformed entry anywhere crashed every run's done commit."""
    prefix = unique("bad-neighbours") + "/"
    listed = upload(s3, prefix, good_invoices(6, seed=73))
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=save_llm_block(llm.base_url, API_KEY),
    )
    elsewhere = {f"elsewhere/{name}.pdf": raw for name, raw in MALFORMED_ELSEWHERE.items()}
    doc = {"format": 1, "revision": 1, "entries": elsewhere}
    s3.put(params["manifest_key"], json.dumps(doc).encode())

    for _ in range(2):  # every run that does not touch them
        summary = await run_flow(params)
        assert summary.__class__.__name__ == "RunSummary", summary
        assert summary.malformed_entries == sorted(elsewhere)  # reported by the run
    report = assert_invariants(s3, params, listed)
    assert report.done == listed
    raw = json.loads(s3.get(params["manifest_key"]).body)["entries"]
    assert {k: raw[k] for k in elsewhere} == elsewhere  # left exactly as they were
    assert sorted(elsewhere) == _store(s3, params).read_sync().malformed


def _store(s3: S3Store, params: dict[str, Any]) -> Any:
    from invoiceflow.manifest import ManifestStore

    return ManifestStore(s3, params["manifest_key"], lock=_no_writes)


def _no_writes() -> Any:
    raise AssertionError("read only")


BROKEN = {
    "invalid JSON": b'{"format": 1, "entries": {"x',
    "a list": b"[]",
    "wrong format": b'{"format": 2, "entries": {}}',
    "entries a list": b'{"format": 1, "entries": []}',
    "oversized": None,  # a valid manifest over the run's `max_manifest_bytes`
}


@pytest.mark.parametrize("case", BROKEN)
async def test_an_unreadable_manifest_stops_the_run_and_rebuild_rebills_nothing(
    s3: S3Store, llm: LLMServerHandle, case: str
) -> None:
    """Before: `entries: []` read as empty (everything re-billed); the rest crashed the
    run with a bare decode error, and `reconcile` could not repair any of them."""
    from flows.cli import app

    prefix = unique("broken-manifest") + "/"
    listed = upload(s3, prefix, good_invoices(4, seed=79))
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=save_llm_block(llm.base_url, API_KEY),
    )
    first = await run_flow(params)
    assert first.done == len(listed), first
    if BROKEN[case] is None:  # other prefixes' entries push it over the run's limit
        entries = manifest_entries(s3, params["manifest_key"])
        some = next(iter(entries.values()))
        entries |= {f"other/{i:05d}.pdf": some for i in range(1200)}
        body = json.dumps({"format": 1, "revision": 9, "entries": entries}).encode()
        params["max_manifest_bytes"] = len(body) - 1
    else:
        body = BROKEN[case]
    s3.put(params["manifest_key"], body)
    calls_before = llm.stats()["by_key"]
    limit = ["--max-manifest-bytes", str(params.get("max_manifest_bytes", 256 * 1024**2))]

    stopped = await run_flow(params)
    assert "ManifestUnreadable" in repr(stopped) or "unreadable" in str(stopped), stopped
    assert "invoiceflow reconcile --rebuild" in str(stopped)
    assert llm.stats()["by_key"] == calls_before  # no work at all
    assert s3.get(params["manifest_key"]).body == body  # nothing written over it

    rebuild = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        [
            "reconcile",
            "--rebuild",
            "--prefix", prefix,
            "--results-prefix", params["results_prefix"],
            "--manifest-key", params["manifest_key"],
            "--manifest-lock", params["manifest_lock"],
            *limit,
        ],
    )  # fmt: skip
    assert rebuild.exit_code == 0, rebuild.output
    backups = list_keys(s3, params["manifest_key"] + ".broken-")
    assert len(backups) == 1 and s3.get(backups.pop()).body == body, backups
    rerun = await run_flow(params)
    assert rerun.processed == 0, rerun
    report = assert_invariants(
        s3,
        params,
        listed,
        done_before_retry=listed,
        llm_by_key_before_retry=calls_before,
        llm_by_key_now=llm.stats()["by_key"],
    )
    assert report.done == listed
    print(f"{case}: stopped before any work, rebuilt, rerun processed {rerun.processed}")


def test_an_empty_results_prefix_cannot_overwrite_the_manifest() -> None:
    """Before: results_prefix="" and a source `manifest.pdf` wrote its result over
    `manifest.json`, and every entry was lost."""
    from pydantic import ValidationError

    from flows.params import ProcessInvoicesParams
    from invoiceflow.storage import invoice_id, result_key

    assert result_key("", invoice_id("manifest.pdf")) == "manifest.json"  # the collision
    with pytest.raises(ValidationError, match="a result could overwrite it"):
        ProcessInvoicesParams(source_prefix="", results_prefix="", manifest_key="manifest.json")
    with pytest.raises(ValidationError, match="ends like a source"):
        ProcessInvoicesParams(manifest_key="state/manifest.pdf")
    # Empty prefixes stay allowed where nothing can collide.
    ProcessInvoicesParams(source_prefix="", results_prefix="results/")
    ProcessInvoicesParams(source_prefix="", results_prefix="", manifest_key="state/manifest")


async def test_deleting_the_lock_mid_run_fails_it_typed_and_the_retry_rebills_nothing(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    """Issue 11 #7. Before: both runs crashed with a raw ConcurrencySlotAcquisitionError,
    29 results were left with no done entry, and after the lock was recreated and the
    runs retried, 33 invoices had been billed twice."""
    from flows.leases import lease_client

    prefix = unique("lock-deleted") + "/"
    listed = upload(s3, prefix, good_invoices(40, seed=83))
    lock = await create_lock(unique("lock"))
    params = flow_params(
        prefix,
        lock,
        extractor_block=save_llm_block(llm.base_url, API_KEY),
        max_llm_concurrency=2,
        manifest_lock_wait_s=3,
    )
    llm.reset()
    llm.configure(latency_s=0.5, jitter_s=0.05)  # ~10 s of work: the lock goes early

    async def delete_lock_mid_run() -> None:
        await wait_until(lambda: len(done_keys(s3, params["manifest_key"])) >= 3, 120, 0.05)
        # As an operator who asks again at once: on SQLite the delete (a read, then a
        # write) is answered 503 while the runs' lease requests write, and Prefect's
        # client would wait 2, 4, 8 s between tries, past the runs' end.
        async with lease_client() as client:
            await client.delete_global_concurrency_limit_by_name(lock)

    try:
        stopped, _ = await asyncio.gather(run_flow(params), delete_lock_mid_run())
        assert isinstance(stopped, Exception), stopped
        assert "ConcurrencySlotAcquisitionError" not in type(stopped).__name__
        assert f"prefect gcl create {lock} --limit 1" in str(stopped), stopped
        done_at_stop = done_keys(s3, params["manifest_key"])
        calls_at_stop = llm.stats()["by_key"]
        await create_lock(lock)  # the operator follows the message
        retry = await run_flow(params)
    finally:
        llm.configure(latency_s=0.02, jitter_s=0.0)
    calls = llm.stats()["by_key"]
    billed_twice = sorted(k for k, n in calls.items() if n > 1)
    print(
        f"lock deleted: {len(done_at_stop)} done when it stopped, "
        f"{sum(calls_at_stop.values())} LLM calls by then; after the retry "
        f"{sum(calls.values())} calls for {len(listed)} invoices, {len(billed_twice)} twice"
    )
    assert retry.__class__.__name__ == "RunSummary", retry
    report = assert_invariants(
        s3,
        params,
        listed,
        done_before_retry=done_at_stop,
        llm_by_key_before_retry=calls_at_stop,
        llm_by_key_now=calls,
    )
    assert report.done == listed
    # Nothing done before the lock went was billed again (checked above per invoice), and
    # the results written after it were recorded from their objects, with no call.
    assert billed_twice == []
