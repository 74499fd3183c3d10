"""Fault injection: bad input and failing infrastructure, end to end through the flow.

Every case ends with `assert_invariants` (tests/support.py): no lost manifest
update, manifest and results agree, and nothing done was sent to the LLM again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import (
    MAX_PAGES,
    MAX_PDF_BYTES,
    OPERATOR_AGENT,
    assert_invariants,
    bad_inputs,
    create_flow_run,
    create_lock,
    direct_s3,
    done_keys,
    execute_flow_run,
    flow_params,
    flow_run_state,
    good_invoices,
    list_keys,
    manifest_entries,
    operator_s3,
    owner_only_encrypted_invoice,
    restart_prefect_server,
    run_flow,
    run_flow_by_engine,
    save_bucket_block,
    save_llm_block,
    tracking_number_invoice,
    unique,
    upload,
    wait_until,
)

from devtools.llm_server import LLMServerHandle, running_llm_server
from devtools.s3_fault_proxy import ProxiedRequest, running_s3_fault_proxy
from invoiceflow import stack
from invoiceflow.manifest import ManifestEntry, ManifestStore, Outcome, Status
from invoiceflow.storage import S3Store, invoice_id, result_key

pytestmark = pytest.mark.faults

API_KEY = "sk-faults-" + "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def s3(local_stack: stack.StackInfo) -> S3Store:
    return direct_s3(local_stack.s3_endpoint, local_stack.bucket)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(latency_s=0.02, api_key=API_KEY) as handle:
        yield handle


async def test_bad_inputs_fail_permanently_with_a_reason_and_are_not_retried(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    from flows.summary import InvoicesFailed

    prefix = unique("bad") + "/"
    bad = bad_inputs()
    good = upload(s3, prefix, good_invoices(4))
    good |= upload(s3, prefix, [("owner-only-encrypted.pdf", owner_only_encrypted_invoice())])
    expected = {f"{prefix}{b.name}": b for b in bad}
    upload(s3, prefix, [(b.name, b.data) for b in bad])
    listed = good | set(expected)
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=save_llm_block(llm.base_url, API_KEY),
        max_pages=MAX_PAGES,
        max_pdf_bytes=MAX_PDF_BYTES,
    )
    llm.reset()

    first = await run_flow(params)
    assert isinstance(first, InvoicesFailed), first
    report = assert_invariants(s3, params, listed)
    assert report.done == good
    assert report.failed == set(expected)
    for key, b in expected.items():
        entry = report.entries[key]
        assert (entry["error_kind"], entry.get("transient")) == (b.kind, False), (key, entry)
        for word in b.message_words:
            assert word in entry["error_message"], (key, entry["error_message"])
    print("bad inputs:", {b.name: report.entries[k]["error_message"] for k, b in expected.items()})
    # Classified before any LLM call: the LLM saw exactly the good invoices, once each.
    assert llm.stats()["by_key"] == {k: 1 for k in good}

    # A rerun retries none of the permanent failures and re-bills nothing.
    before = llm.stats()["by_key"]
    again = await run_flow(params)
    assert again.processed == 0, again
    entries = manifest_entries(s3, params["manifest_key"])
    assert {k: e["attempts"] for k, e in entries.items()} == {k: 1 for k in listed}
    assert llm.stats()["by_key"] == before

    # A changed source (new ETag) is retried: the password-protected file is replaced
    # by its unprotected original, and only it is processed.
    fixed = f"{prefix}password.pdf"
    upload(s3, prefix, [("password.pdf", good_invoices(1, seed=101)[0][1])])
    third = await run_flow(params)
    assert (third.processed, third.done) == (1, 1), third
    report = assert_invariants(
        s3,
        params,
        listed,
        done_before_retry=good,
        llm_by_key_before_retry=before,
        llm_by_key_now=llm.stats()["by_key"],
    )
    assert report.done == good | {fixed}
    assert report.entries[fixed]["attempts"] == 2
    assert llm.stats()["by_key"][fixed] == 1

    # selection=failed retries permanent failures on purpose (e.g. after raising a limit).
    forced = await run_flow({**params, "selection": "failed", "max_pages": MAX_PAGES + 2})
    assert isinstance(forced, InvoicesFailed)
    entries = manifest_entries(s3, params["manifest_key"])
    assert entries[f"{prefix}long.pdf"]["status"] == "done"
    assert entries[f"{prefix}empty.pdf"]["attempts"] == 2


async def test_llm_429_500_and_timeouts_are_retried_and_a_rerun_bills_only_the_failed(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    prefix = unique("llm-faults") + "/"
    docs = good_invoices(30, seed=23)
    listed = upload(s3, prefix, docs)
    unlucky = sorted(listed)[:2]  # these exhaust the SDK's retries in the first run
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        # Small timeout so a hung request costs seconds, not minutes; 4 SDK retries.
        extractor_block=save_llm_block(llm.base_url, API_KEY, timeout_s=1.5, max_retries=4),
    )
    llm.reset()
    plan = llm.set_faults(
        [
            {"match": unlucky[0], "status": 500, "times": 5},  # 1 call + 4 retries
            {"match": unlucky[1], "status": "timeout", "times": 5},
            {"match": "*", "status": "timeout", "times": 6},
        ],
        rate=0.2,
        rate_statuses=[429, 500],
        seed=5,
    )
    assert plan["rate"] == 0.2

    first = await run_flow(params)
    stats = llm.stats()
    report = assert_invariants(s3, params, listed)
    # The SDK's retries absorbed the random faults (one invoice drawing five in a row is
    # possible but rare); the scripted ones got through as transient failures.
    errors = report.errors()
    assert {k: errors.get(k) for k in unlucky} == {
        unlucky[0]: ("server_error", True),
        unlucky[1]: ("timeout", True),
    }
    assert len(errors) <= 4 and all(transient for _, transient in errors.values()), errors
    assert stats["by_status"].get("429", 0) + stats["by_status"].get("500", 0) >= 5
    assert stats["by_status"]["timeout"] >= 6
    assert {stats["by_key"][k] for k in unlucky} == {5}
    assert first.__class__.__name__ == "InvoicesFailed"

    # The rerun (faults still on) sends only the transient failures to the LLM.
    rerun = await run_flow(params)
    assert rerun.processed == len(errors), rerun
    after = llm.stats()["by_key"]
    report = assert_invariants(
        s3,
        params,
        listed,
        done_before_retry=report.done,
        llm_by_key_before_retry=stats["by_key"],
        llm_by_key_now=after,
    )
    assert report.done == listed
    assert {after[k] > stats["by_key"][k] for k in unlucky} == {True}
    print(f"LLM faults, first run: {stats['total']} calls {stats['by_status']}; failed {errors}")


async def test_s3_slowdown_and_connection_resets_are_retried_by_botocore(
    s3: S3Store, llm: LLMServerHandle, local_stack: stack.StackInfo
) -> None:
    prefix = unique("s3-faults") + "/"
    listed = upload(s3, prefix, good_invoices(30, seed=31))
    with running_s3_fault_proxy(
        local_stack.s3_endpoint,
        slowdown_rate=0.12,
        reset_before_rate=0.05,
        reset_after_rate=0.05,
        seed=3,
    ) as proxy:
        # And the nastiest reset for sure: the first conditional manifest writes land,
        # but their answers are lost, so botocore's retry meets its own write (412).
        proxy.add_rule(lambda r: r.conditional_put, "reset_after", times=2)
        params = flow_params(
            prefix,
            await create_lock(unique("lock")),
            extractor_block=save_llm_block(llm.base_url, API_KEY),
            bucket_block=await save_bucket_block(proxy.url, local_stack.bucket),
        )
        llm.reset()
        first = await run_flow(params)
        faults = proxy.stats()
        assert (first.processed, first.done) == (30, 30), first
        report = assert_invariants(s3, params, listed)
        assert report.done == listed
        assert llm.stats()["by_key"] == {k: 1 for k in listed}
        # Every kind of fault really happened, on reads and on writes.
        assert faults["slowdown"] and faults["reset_before"] and faults["reset_after"] >= 2, faults

        before = llm.stats()["by_key"]
        rerun = await run_flow(params)
        assert rerun.processed == 0, rerun
        assert_invariants(
            s3,
            params,
            listed,
            done_before_retry=report.done,
            llm_by_key_before_retry=before,
            llm_by_key_now=llm.stats()["by_key"],
        )
    print(f"S3 faults injected over {faults['requests']} requests: {faults}")


async def test_s3_outage_beyond_the_retries_fails_the_invoice_not_the_run(
    s3: S3Store, llm: LLMServerHandle, local_stack: stack.StackInfo
) -> None:
    prefix = unique("s3-outage") + "/"
    listed = upload(s3, prefix, good_invoices(8, seed=37))
    unreadable, unwritable = sorted(listed)[:2]
    with running_s3_fault_proxy(local_stack.s3_endpoint) as proxy:
        params = flow_params(
            prefix,
            await create_lock(unique("lock")),
            extractor_block=save_llm_block(llm.base_url, API_KEY),
            # Two attempts, so the outage outlasts the retries in a second, not ~35 s.
            bucket_block=await save_bucket_block(proxy.url, local_stack.bucket, max_attempts=2),
        )
        unwritable_result = result_key(params["results_prefix"], invoice_id(unwritable))

        def source_get(r: ProxiedRequest) -> bool:
            return r.method == "GET" and r.path.endswith(unreadable)

        def result_put(r: ProxiedRequest) -> bool:
            return r.method == "PUT" and r.path.endswith(unwritable_result)

        proxy.add_rule(source_get, "slowdown", times=-1)
        proxy.add_rule(result_put, "reset_before", times=-1)
        llm.reset()
        first = await run_flow(params)
        report = assert_invariants(s3, params, listed)
        assert report.errors() == {
            unreadable: ("s3_error", True),
            unwritable: ("s3_error", True),
        }, first
        assert "SlowDown" in report.entries[unreadable]["error_message"]
        assert unreadable not in llm.stats()["by_key"]  # never got as far as the LLM

        # S3 is back: the rerun retries exactly the two, and re-bills nothing done.
        proxy.clear_rules()
        before = llm.stats()["by_key"]
        rerun = await run_flow(params)
        assert (rerun.processed, rerun.done) == (2, 2), rerun
        report = assert_invariants(
            s3,
            params,
            listed,
            done_before_retry=report.done,
            llm_by_key_before_retry=before,
            llm_by_key_now=llm.stats()["by_key"],
        )
        assert report.done == listed


@dataclass(frozen=True)
class OperatorNote:
    """An out-of-band manifest edit: what a person or another tool might write."""

    key: str
    text: str

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        entries[self.key] = ManifestEntry(
            status=Status.failed,
            source_etag="operator",
            error_kind="operator_note",
            error_message=self.text,
            created_at=now,
            updated_at=now,
        ).model_dump(mode="json", exclude_none=True)
        return Outcome(True, 0)


async def test_three_concurrent_runs_on_overlapping_prefixes_and_an_out_of_band_writer(
    s3: S3Store, llm: LLMServerHandle, local_stack: stack.StackInfo
) -> None:
    base = unique("overlap") + "/"
    # The same file names at two levels: the runs over base/ and base/a/ must not
    # write one invoice's result over the other's.
    docs = good_invoices(24, seed=41)
    listed = upload(s3, base, docs[:12])
    listed |= upload(
        s3, f"{base}a/", [(f"invoice-{i:04d}", pdf) for i, (_, pdf) in enumerate(docs[12:])]
    )
    lock = await create_lock(unique("lock"))
    with running_s3_fault_proxy(local_stack.s3_endpoint) as proxy:
        bucket_block = await save_bucket_block(proxy.url, local_stack.bucket)
        common = {
            "manifest_key": f"manifests/{base.rstrip('/')}.json",
            "results_prefix": f"results/{base}",
            "extractor_block": save_llm_block(llm.base_url, API_KEY),
            "bucket_block": bucket_block,
            "max_llm_concurrency": 4,
        }
        runs = [
            flow_params(base, lock, **common),
            flow_params(f"{base}a/", lock, **common),
            flow_params(base, lock, **common),
        ]
        llm.reset()
        llm.configure(latency_s=0.15, jitter_s=0.05)
        # The out-of-band writer skips the Prefect lock entirely; only If-Match keeps
        # its edits and the runs' updates from overwriting each other.
        outsider = ManifestStore(
            operator_s3(proxy.url, local_stack.bucket),
            common["manifest_key"],
            lock=contextlib.nullcontext,
        )
        notes = [OperatorNote(f"operator/note-{i}.pdf", f"checked by hand #{i}") for i in range(8)]
        manifest_path = f"/{local_stack.bucket}/{common['manifest_key']}"

        def manifest_put(r: ProxiedRequest, *, by_operator: bool) -> bool:
            operator = OPERATOR_AGENT in r.headers.get("user-agent", "")
            return r.method == "PUT" and r.path == manifest_path and operator == by_operator

        def manifest_etag() -> str | None:
            with contextlib.suppress(KeyError):
                return s3.get(common["manifest_key"]).etag
            return None

        async def write_notes() -> None:
            # 1. The operator loses a race: its PUT is parked until a run commits.
            gate = proxy.hold(functools.partial(manifest_put, by_operator=True))
            first = asyncio.create_task(outsider.commit([notes[0]]))
            await wait_until(gate.arrived.is_set, 60)
            seen = manifest_etag()
            await wait_until(lambda: manifest_etag() != seen, 60)
            gate.open()
            assert (await first)[0].applied
            # 2. A run loses a race: its PUT (under the slot) is parked while the
            #    operator writes; If-Match sends it back to re-read and re-apply.
            gate = proxy.hold(functools.partial(manifest_put, by_operator=False))
            await wait_until(gate.arrived.is_set, 60)
            assert (await outsider.commit([notes[1]]))[0].applied
            gate.open()
            # 3. Then plain interleaving.
            for note in notes[2:]:
                await asyncio.sleep(0.2)
                assert (await outsider.commit([note]))[0].applied

        *summaries, _ = await asyncio.gather(*(run_flow(p) for p in runs), write_notes())
        llm.configure(latency_s=0.0, jitter_s=0.0)

    assert [s.__class__.__name__ for s in summaries] == ["RunSummary"] * 3, summaries
    # Claims split the work: every invoice was processed by exactly one run, once.
    assert sum(s.processed for s in summaries) == len(listed), summaries
    assert llm.stats()["by_key"] == {k: 1 for k in listed}
    report = assert_invariants(s3, runs[0], listed)
    assert report.done == listed
    entries = report.entries
    assert {n.key: entries[n.key]["error_message"] for n in notes} == {n.key: n.text for n in notes}
    # Both staged races really ended in a 412 and a re-apply, and nothing was lost.
    assert outsider.conflicts >= 1
    assert proxy.stats()["by_status"].get("412", 0) >= 2, proxy.stats()
    print(f"operator: {len(notes)} edits, {outsider.conflicts} conflicts; {proxy.stats()}")

    before = llm.stats()["by_key"]
    rerun = await run_flow(
        flow_params(base, lock, **{**common, "bucket_block": "invoiceflow-bucket"})
    )
    assert rerun.processed == 0, rerun
    assert_invariants(
        s3,
        runs[0],
        listed,
        done_before_retry=listed,
        llm_by_key_before_retry=before,
        llm_by_key_now=llm.stats()["by_key"],
    )


async def test_a_writer_that_lost_its_slot_is_stopped_by_if_match(
    s3: S3Store, llm: LLMServerHandle, local_stack: stack.StackInfo
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from flows.lock import manifest_lock

    prefix = unique("lost-lease") + "/"
    listed = upload(s3, prefix, good_invoices(6, seed=43))
    lock = await create_lock(unique("lock"))
    with running_s3_fault_proxy(local_stack.s3_endpoint) as proxy:
        params = flow_params(
            prefix,
            lock,
            extractor_block=save_llm_block(llm.base_url, API_KEY),
            bucket_block=await save_bucket_block(proxy.url, local_stack.bucket),
        )
        manifest_path = f"/{local_stack.bucket}/{params['manifest_key']}"
        # The stale writer: takes the real slot, reads the manifest, and stalls with
        # its conditional PUT in flight (a GC pause, a slow network).
        stale = ManifestStore(
            operator_s3(proxy.url, local_stack.bucket),
            params["manifest_key"],
            lock=manifest_lock(lock),
        )
        await stale.commit([OperatorNote("operator/before.pdf", "written first")])
        gate = proxy.hold(
            lambda r: (
                r.method == "PUT"
                and r.path == manifest_path
                and OPERATOR_AGENT in r.headers.get("user-agent", "")
            )
        )
        stalled = asyncio.create_task(
            stale.commit([OperatorNote("operator/stalled.pdf", "written by the stale writer")])
        )
        await wait_until(gate.arrived.is_set, 60)
        async with get_client() as client:
            assert (await client.read_global_concurrency_limit_by_name(lock)).active_slots == 1
            # Its slot is taken away (an operator frees a "stuck" slot; an expired lease
            # has the same effect), and a flow run takes the slot and does its work.
            await client.update_global_concurrency_limit(
                lock, GlobalConcurrencyLimitUpdate(active_slots=0)
            )
        llm.reset()
        summary = await run_flow(params)
        assert summary.done == len(listed), summary
        newer = s3.get(params["manifest_key"]).etag

        # The stale writer wakes up: If-Match on the ETag it read fails (412), so it
        # re-reads and re-applies its edit on top instead of overwriting the run's work.
        gate.open()
        assert (await stalled)[0].applied
        assert stale.conflicts == 1
        assert proxy.stats()["by_status"].get("412") == 1
        assert s3.get(params["manifest_key"]).etag != newer

    report = assert_invariants(s3, params, listed)
    assert report.done == listed
    assert {"operator/before.pdf", "operator/stalled.pdf"} <= set(report.entries)
    assert llm.stats()["by_key"] == {k: 1 for k in listed}
    # The slot is free again (nothing stuck) and a rerun re-bills nothing.
    async with get_client() as client:
        assert (await client.read_global_concurrency_limit_by_name(lock)).active_slots == 0
    before = llm.stats()["by_key"]
    rerun = await run_flow({**params, "bucket_block": "invoiceflow-bucket"})
    assert rerun.processed == 0, rerun
    assert_invariants(
        s3,
        params,
        listed,
        done_before_retry=listed,
        llm_by_key_before_retry=before,
        llm_by_key_now=llm.stats()["by_key"],
    )


async def _slot_in_use(lock: str) -> int:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(lock)).active_slots


async def _kill_mid_run(
    proc: subprocess.Popen[bytes],
    s3: S3Store,
    params: dict[str, Any],
    lock: str,
    at_least_done: int,
) -> set[str]:
    """SIGKILL the flow process once some invoices are done, preferably between commits.

    Killed while holding the manifest slot, the slot would stay taken until its lease
    (60 s) expires; that is Prefect's repossessor at work and only slows the retry, so
    the kill waits (briefly) for a moment when the slot is free.
    """
    await wait_until(
        lambda: proc.poll() is None and len(done_keys(s3, params["manifest_key"])) >= at_least_done,
        120,
        interval_s=0.05,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await _slot_in_use(lock) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    return done_keys(s3, params["manifest_key"])


@pytest.mark.parametrize("retry", ["same-run", "new-run"])
async def test_flow_process_sigkilled_mid_run_then_retried(
    retry: str, s3: S3Store, local_stack: stack.StackInfo, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry, Crashed

    prefix = unique(f"sigkill-{retry}") + "/"
    listed = upload(s3, prefix, good_invoices(24, seed=47))
    lock = await create_lock(unique("lock"))
    with running_llm_server(latency_s=0.6, jitter_s=0.1, api_key=API_KEY) as llm:
        params = flow_params(
            prefix,
            lock,
            extractor_block=save_llm_block(llm.base_url, API_KEY),
            max_llm_concurrency=2,
        )
        run_id = await create_flow_run(params)
        proc = execute_flow_run(run_id, local_stack.env(), tmp_path / "first.log")
        done_at_kill = await _kill_mid_run(proc, s3, params, lock, at_least_done=3)
        llm_at_kill = llm.stats()["by_key"]
        entries = manifest_entries(s3, params["manifest_key"])
        in_flight = {k for k, e in entries.items() if e["status"] in ("pending", "processing")}
        assert done_at_kill and in_flight, entries  # really killed mid-run
        assert set(entries) == listed  # every claim was recorded before any work
        # What a worker reports when its flow process dies.
        async with get_client() as client:
            await client.set_flow_run_state(
                run_id, Crashed(message="flow process killed (SIGKILL)"), force=True
            )

        if retry == "same-run":
            # Retry in the UI: the same flow run id runs again (here in this process,
            # through the engine entry point a worker's process calls) and re-claims its
            # own claims, whatever their age.
            async with get_client() as client:
                await client.set_flow_run_state(run_id, AwaitingRetry(), force=True)
                flow_run = await client.read_flow_run(run_id)
            summary = await run_flow_by_engine(flow_run)
            assert summary.processed == len(listed) - len(done_at_kill), summary
            assert (await flow_run_state(run_id)).is_completed()
        else:
            # A new run takes over the claims of the crashed one at once.
            summary = await run_flow(params)
            assert summary.processed == len(listed) - len(done_at_kill), summary

        report = assert_invariants(
            s3,
            params,
            listed,
            done_before_retry=done_at_kill,
            llm_by_key_before_retry=llm_at_kill,
            llm_by_key_now=llm.stats()["by_key"],
        )
        assert report.done == listed
        # Invoices in flight at the kill were attempted again under a new attempt number.
        assert {report.entries[k]["attempts"] for k in in_flight} == {2}
        again = sum(llm.stats()["by_key"].get(k, 0) for k in in_flight)
    print(
        f"SIGKILL ({retry}): {len(done_at_kill)} done at the kill, {len(in_flight)} in flight;"
        f" LLM calls for the in-flight ones, both runs: {again}"
    )


@pytest.fixture
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackInfo]:
    """A stack of this test's own, since its Prefect server gets restarted."""
    state = tmp_path_factory.mktemp("own-stack")
    prefect_port = stack.free_port()
    with pytest.MonkeyPatch.context() as env:
        # The server's environment: its own URL (not the session server's), and a
        # repossessor that looks for expired leases every second instead of 15.
        env.setenv("PREFECT_API_URL", f"http://127.0.0.1:{prefect_port}/api")
        env.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "1")
        info, _ = stack.up(
            state,
            prefect_port=prefect_port,
            s3_port=stack.free_port(),
            bucket="own-stack",
            die_with_caller=True,
        )
    try:
        yield info
    finally:
        stack.down(state)


async def test_prefect_server_restarted_mid_run_leaves_no_slot_stuck(
    own_stack: stack.StackInfo, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    s3 = direct_s3(own_stack.s3_endpoint, own_stack.bucket)
    s3.ensure_bucket()
    prefix = unique("restart") + "/"
    listed = upload(s3, prefix, good_invoices(24, seed=53))
    # Slow enough calls (24 invoices, 2 at a time, ~18 s) that the restart lands mid-run:
    # at 0.5 s a run sometimes finished before the test could take the manifest slot.
    with (
        running_llm_server(latency_s=1.5, jitter_s=0.1, api_key=API_KEY) as llm,
        temporary_settings({PREFECT_API_URL: own_stack.api_url}),
    ):
        lock = await create_lock(unique("lock"))
        params = flow_params(
            prefix,
            lock,
            extractor_block=save_llm_block(llm.base_url, API_KEY),
            bucket_block=await save_bucket_block(own_stack.s3_endpoint, own_stack.bucket),
            max_llm_concurrency=2,
        )
        run_id = await create_flow_run(params)
        proc = execute_flow_run(run_id, own_stack.env(), tmp_path / "flow.log")
        await wait_until(lambda: len(done_keys(s3, params["manifest_key"])) >= 3, 180, 0.1)
        # Hold the manifest slot across the restart, as a commit in progress would.
        async with get_client() as client:
            while True:
                with contextlib.suppress(Exception):  # 423 while the run holds it
                    lease = await client.increment_concurrency_slots_with_lease(
                        names=[lock], slots=1, mode="concurrency", lease_duration=60
                    )
                    break
                await asyncio.sleep(0.05)
        lease_id = lease.json()["lease_id"]
        done_before_restart = done_keys(s3, params["manifest_key"])
        llm_before_restart = llm.stats()["by_key"]

        restarted = await asyncio.to_thread(restart_prefect_server, own_stack)
        assert proc.poll() is None, (tmp_path / "flow.log").read_text()[-3000:]
        async with get_client() as client:
            # The lease survived the restart (it is on disk), so its holder can release
            # it; with in-memory lease storage this slot would stay taken for good.
            assert (await client.read_global_concurrency_limit_by_name(lock)).active_slots == 1
            await client.release_concurrency_slots_with_lease(lease_id)
        exit_code = await asyncio.to_thread(proc.wait, 240)
        assert exit_code == 0, (tmp_path / "flow.log").read_text()[-3000:]
        state = await flow_run_state(run_id)
        assert state.is_completed(), state
        async with get_client() as client:
            assert (await client.read_global_concurrency_limit_by_name(lock)).active_slots == 0
        # The run rode out the restart: everything done, nothing done before the restart
        # sent to the LLM again after it, and each invoice exactly once overall.
        report = assert_invariants(
            s3,
            params,
            listed,
            done_before_retry=done_before_restart,
            llm_by_key_before_retry=llm_before_restart,
            llm_by_key_now=llm.stats()["by_key"],
        )
        assert report.done == listed
        assert llm.stats()["by_key"] == {k: 1 for k in listed}
    print(
        f"Prefect restart: {len(done_before_restart)} of {len(listed)} done before it, "
        f"run ended {state.type.value}, pid {own_stack.prefect_pid} -> {restarted.prefect_pid}"
    )


async def test_a_29_digit_token_fails_only_its_invoice_and_nothing_is_billed_twice(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    """Issue 11 break 1: `parse_amount` raised InvalidOperation in the evidence builder.

    Before the fix, three runs in a row ended `InvalidOperation`: none of the 40 good
    invoices reached `done`, results were left without a `done` entry, and each rerun
    took over the crashed run's claims and billed them again.
    """
    prefix = unique("huge-number") + "/"
    good = upload(s3, prefix, good_invoices(40, seed=59))
    (bad,) = upload(s3, prefix, [("tracking.pdf", tracking_number_invoice())])
    listed = good | {bad}
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=save_llm_block(llm.base_url, API_KEY),
    )
    llm.reset()
    outcomes = [await run_flow(params) for _ in range(3)]
    by_key = llm.stats()["by_key"]
    entries = manifest_entries(s3, params["manifest_key"])
    done = {k for k in good if entries.get(k, {}).get("status") == "done"}
    billed_twice = {k: n for k, n in by_key.items() if n > 1}
    print(
        f"29-digit token: runs ended {[type(o).__name__ for o in outcomes]}; "
        f"{len(done)} of {len(good)} good done; bad {entries.get(bad)}; "
        f"billed more than once: {billed_twice}"
    )
    report = assert_invariants(s3, params, listed)
    assert report.done >= good
    bad_entry = report.entries[bad]
    assert bad_entry["status"] == "done" or (
        bad_entry["error_kind"] == "internal_error" and bad_entry["transient"] is False
    ), bad_entry
    if bad_entry["status"] == "done":  # the token is ignored, never read as an amount
        assert "12345678901234567890123456789" not in str(bad_entry.get("total"))
    # Each invoice reached the LLM once over the three runs: nothing was re-billed.
    assert by_key == {k: 1 for k in listed}, billed_twice
    assert [getattr(o, "processed", None) for o in outcomes[1:]] == [0, 0], outcomes


async def test_lock_deleted_mid_run_stops_both_runs_cleanly_and_the_retry_bills_nothing_twice(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    """Issue 11 break 7: `prefect gcl delete` mid-run crashed both runs with a raw
    ConcurrencySlotAcquisitionError, left results without a `done` entry, and the retry
    after the lock was recreated billed 33 invoices twice.
    """
    from flows.leases import lease_client
    from flows.summary import RunSummary
    from invoiceflow.manifest import ManifestLockLost

    base = unique("lock-deleted") + "/"
    docs = good_invoices(40, seed=61)
    listed = upload(s3, f"{base}a/", docs[:20]) | upload(s3, f"{base}b/", docs[20:])
    lock = await create_lock(unique("lock"))
    common = {
        "manifest_key": f"manifests/{base.rstrip('/')}.json",
        "results_prefix": f"results/{base}",
        "max_llm_concurrency": 2,
        "manifest_lock_wait_s": 3,
    }
    # Two runs over two halves, one manifest and one lock, both busy when it goes;
    # each with an extractor block of its own, so their provider-wide limits are apart.
    runs = [
        flow_params(
            f"{base}{half}/",
            lock,
            **common,
            extractor_block=save_llm_block(llm.base_url, API_KEY),
        )
        for half in ("a", "b")
    ]
    params = {**runs[0], "source_prefix": base}
    llm.reset()
    llm.configure(latency_s=0.5, jitter_s=0.1)

    async def delete_lock_mid_run() -> set[str]:
        def mid_run() -> bool:
            entries = manifest_entries(s3, params["manifest_key"])
            done = sum(e["status"] == "done" for e in entries.values())
            return done >= 4 and len(entries) == len(listed) and done < len(listed) - 4

        # Both runs have claimed their half (the second often waits for the manifest
        # slot a busy first run keeps taking), and work is left.
        await wait_until(mid_run, 120, 0.05)
        # As an operator who asks again at once: on SQLite the delete (a read, then a
        # write) is answered 503 while the runs' lease requests write, and Prefect's
        # client would wait 2, 4, 8 s between tries, past the runs' end.
        async with lease_client() as client:
            await client.delete_global_concurrency_limit_by_name(lock)
        return done_keys(s3, params["manifest_key"])

    try:
        *ends, done_at_delete = await asyncio.gather(
            *(run_flow(p) for p in runs), delete_lock_mid_run()
        )
    finally:
        llm.configure(latency_s=0.0, jitter_s=0.0)
    by_key_before = llm.stats()["by_key"]
    entries = manifest_entries(s3, params["manifest_key"])
    results = list_keys(s3, params["results_prefix"])
    done = {k for k, e in entries.items() if e["status"] == "done"}
    print(
        f"lock deleted mid-run: runs ended {[type(e).__name__ for e in ends]}; "
        f"{len(done_at_delete)} done at the delete, {len(done)} done after; "
        f"{len(results) - len(done)} results without a done entry; "
        f"LLM calls {sum(by_key_before.values())} for {len(by_key_before)} invoices"
    )
    # A run that was mid-run stops with the command that restores the lock; one that
    # had finished its half has its summary. Never Prefect's raw acquisition error.
    lost = [e for e in ends if isinstance(e, ManifestLockLost)]
    assert lost and all(e in lost or isinstance(e, RunSummary) for e in ends), ends
    assert all(f"prefect gcl create {lock} --limit 1" in str(e) for e in lost)
    # Nothing was extracted twice, even by two runs at once losing their lock.
    assert all(n == 1 for n in by_key_before.values()), by_key_before

    await create_lock(lock)
    retry = await run_flow(params)  # over both halves
    assert isinstance(retry, RunSummary), retry
    by_key = llm.stats()["by_key"]
    report = assert_invariants(s3, params, listed)
    assert report.done == listed
    double_billed = {k: n for k, n in by_key.items() if n > 1}
    print(
        f"after recreating the lock: retry processed {retry.processed}, "
        f"{sum(by_key.values()) - sum(by_key_before.values())} new LLM calls, "
        f"double-billed {len(double_billed)}"
    )
    assert not double_billed
    assert by_key == {k: 1 for k in listed}


async def test_a_deleted_manifest_makes_the_next_run_record_the_results_without_a_call(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    """Issue 11 break 8: a deleted manifest made the next run re-bill everything."""
    prefix = unique("manifest-deleted") + "/"
    listed = upload(s3, prefix, good_invoices(12, seed=71))
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=save_llm_block(llm.base_url, API_KEY),
    )
    llm.reset()
    first = await run_flow(params)
    assert first.done == len(listed), first
    before = llm.stats()["by_key"]
    s3.client.delete_object(Bucket=s3.bucket, Key=params["manifest_key"])

    again = await run_flow(params)
    after = llm.stats()["by_key"]
    print(
        f"deleted manifest: rerun processed {again.processed}, done {again.done}, "
        f"{sum(after.values()) - sum(before.values())} new LLM calls, tokens {again.tokens}"
    )
    assert (again.processed, again.done, again.tokens) == (len(listed), len(listed), 0), again
    report = assert_invariants(
        s3,
        params,
        listed,
        done_before_retry=listed,
        llm_by_key_before_retry=before,
        llm_by_key_now=after,
    )
    assert report.done == listed
