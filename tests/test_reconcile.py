"""`invoiceflow reconcile`: the manifest repaired from results and the source listing.

Unit cases run on moto's S3 with an in-process lock; the end-to-end cases use real
flow runs, the Prefect manifest lock and the CLI.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest
from typer.testing import CliRunner

from invoiceflow import stack
from invoiceflow.manifest import Claim, ManifestStore, Status, Transition
from invoiceflow.reconcile import canonical_result_key, reconcile
from invoiceflow.schema import ExtractionResult, Invoice
from invoiceflow.storage import S3Store

SRC = "in/"
RES = "results/"


def _store(s3: S3Store, lock: asyncio.Lock | None = None) -> ManifestStore:
    shared = lock or asyncio.Lock()
    return ManifestStore(s3, "manifest.json", lock=lambda: shared)


def _source(s3: S3Store, key: str, body: bytes = b"%PDF-1.7 invoice") -> str:
    return s3.put(key, body, content_type="application/pdf")


def _result(s3: S3Store, key: str, etag: str, vendor: str = "ACME GmbH") -> str:
    rkey = canonical_result_key(RES, key)
    result = ExtractionResult(
        source_key=key,
        source_etag=etag,
        extractor="rules",
        pages=1,
        invoice=Invoice(vendor_name=vendor, total=Decimal("119.00"), currency="EUR"),
        extracted_at=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
        source="rules",
    )
    s3.put(rkey, result.model_dump_json().encode())
    return rkey


async def _done(store: ManifestStore, key: str, etag: str, result_key: str) -> None:
    outcome = (await store.commit([Claim(key, etag, "run-1")]))[0]
    await store.commit([Transition(key, outcome.attempt, Status.done, {"result_key": result_key})])


async def reconcile_releasing_every_claim(store: ManifestStore, *, runs: Any) -> Any:
    """`reconcile` of SRC with `--release-claims-after 0`, asking `runs` about holders."""
    return await reconcile(
        store,
        source_prefix=SRC,
        results_prefix=RES,
        release_claims_after=dt.timedelta(0),
        runs=runs,
    )


async def _raw_edit(store: ManifestStore, edit: Any) -> None:
    """A manual edit of the manifest JSON, conditional like every writer's."""
    body, etag = store.s3.get(store.key)
    doc = json.loads(body)
    edit(doc["entries"])
    store.s3.put_conditional(store.key, json.dumps(doc).encode(), if_match=etag)


async def test_a_lost_manifest_is_rebuilt_from_the_results(s3_store: S3Store) -> None:
    store = _store(s3_store)
    keys = [f"{SRC}inv-{i}.pdf" for i in range(5)]
    for key in keys:
        _result(s3_store, key, _source(s3_store, key))
    _source(s3_store, f"{SRC}never-processed.pdf")

    report = await reconcile(store, source_prefix=SRC, results_prefix=RES)

    assert report.marked_done == keys
    entries = store.read_sync().entries
    assert set(entries) == set(keys)  # the unprocessed one stays new: the next run claims it
    for key in keys:
        assert entries[key]["status"] == "done"
        assert entries[key]["result_key"] == canonical_result_key(RES, key)
        assert (entries[key]["vendor_name"], entries[key]["total"]) == ("ACME GmbH", "119.00")
    # Idempotent: a second pass finds nothing to do and does not write.
    revision = store.read_sync().revision
    again = await reconcile(store, source_prefix=SRC, results_prefix=RES)
    assert (again.changes, again.unchanged) == (0, 5)
    assert store.read_sync().revision == revision


async def test_crash_between_result_write_and_done_commit_is_marked_done(
    s3_store: S3Store,
) -> None:
    store = _store(s3_store)
    key = f"{SRC}crashed.pdf"
    etag = _source(s3_store, key)
    claim = (await store.commit([Claim(key, etag, "run-dead")]))[0]
    await store.commit([Transition(key, claim.attempt, Status.processing)])
    _result(s3_store, key, etag)  # the result landed, the done commit never did

    report = await reconcile(store, source_prefix=SRC, results_prefix=RES)

    assert report.marked_done == [key]
    entry = store.read_sync().entry(key)
    assert entry is not None and entry.status is Status.done and entry.attempts == 1
    # The dead run's late transitions cannot undo it.
    late = await store.commit([Transition(key, claim.attempt, Status.failed)])
    assert not late[0].applied


async def test_done_without_its_result_becomes_a_transient_failure(s3_store: S3Store) -> None:
    store = _store(s3_store)
    gone, stale = f"{SRC}gone.pdf", f"{SRC}stale.pdf"
    gone_etag, stale_etag = _source(s3_store, gone), _source(s3_store, stale)
    await _done(store, gone, gone_etag, canonical_result_key(RES, gone))  # never written
    await _done(store, stale, stale_etag, _result(s3_store, stale, "an-older-version"))

    report = await reconcile(store, source_prefix=SRC, results_prefix=RES)

    assert report.result_missing == [gone, stale]
    snap = store.read_sync()
    for key in (gone, stale):
        entry = snap.entry(key)
        assert entry is not None
        assert (entry.status, entry.error_kind, entry.transient) == (
            "failed",
            "result_missing",
            True,
        )
        assert entry.result_key is None
    # A `new` run claims them again.
    again = await store.commit([Claim(gone, gone_etag, "run-2")])
    assert again[0].applied


async def test_only_stale_claims_are_released(s3_store: S3Store) -> None:
    store = _store(s3_store)
    old, fresh = f"{SRC}old-claim.pdf", f"{SRC}fresh-claim.pdf"
    await store.commit([Claim(old, _source(s3_store, old), "run-dead")])
    await store.commit([Claim(fresh, _source(s3_store, fresh), "run-alive")])
    hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    await _raw_edit(store, lambda e: e[old].update(updated_at=hour_ago))

    report = await reconcile(store, source_prefix=SRC, results_prefix=RES)

    assert report.released_claims == [old]
    snap = store.read_sync()
    released, kept = snap.entry(old), snap.entry(fresh)
    assert released is not None and kept is not None
    assert (released.status, released.error_kind, released.transient) == (
        "failed",
        "abandoned",
        True,
    )
    assert "run-dead" in (released.error_message or "")
    assert kept.status is Status.pending  # a live run's claim is left alone


async def test_manual_edits_are_repaired_and_other_prefixes_untouched(
    s3_store: S3Store,
) -> None:
    store = _store(s3_store)
    broken, deleted, orphan = f"{SRC}broken.pdf", f"{SRC}deleted.pdf", f"{SRC}orphan.pdf"
    for key in (broken, deleted, orphan):
        await _done(store, key, etag := _source(s3_store, key), _result(s3_store, key, etag))
    s3_store.client.delete_object(Bucket=s3_store.bucket, Key=orphan)  # source gone
    await store.commit([Claim("elsewhere/x.pdf", "e", "run-9")])

    def edit(entries: dict[str, Any]) -> None:
        entries[broken]["status"] = "finished?"  # not a status
        del entries[deleted]

    await _raw_edit(store, edit)
    before = store.read_sync().entries["elsewhere/x.pdf"]

    report = await reconcile(store, source_prefix=SRC, results_prefix=RES)

    assert report.rebuilt_invalid == [broken]
    assert report.marked_done == [deleted]
    assert report.orphaned_entries == [orphan]
    assert report.orphaned_results == [canonical_result_key(RES, orphan)]
    entries = store.read_sync().entries
    assert entries[broken]["status"] == entries[deleted]["status"] == "done"
    assert entries["elsewhere/x.pdf"] == before

    pruned = await reconcile(store, source_prefix=SRC, results_prefix=RES, prune=True)
    assert pruned.pruned == [orphan]
    assert orphan not in store.read_sync().entries
    # The orphaned result object is reported, never deleted.
    assert s3_store.get(canonical_result_key(RES, orphan)).body


async def test_dry_run_writes_nothing(s3_store: S3Store) -> None:
    store = _store(s3_store)
    key = f"{SRC}a.pdf"
    _result(s3_store, key, _source(s3_store, key))
    report = await reconcile(store, source_prefix=SRC, results_prefix=RES, dry_run=True)
    assert report.marked_done == [key]
    with pytest.raises(KeyError):
        s3_store.get(store.key)


async def test_reconcile_racing_writers_loses_nothing(s3_store: S3Store) -> None:
    """Reconcile applies to the manifest as it is at commit time, under the lock."""
    lock = asyncio.Lock()
    store = _store(s3_store, lock)
    keys = [f"{SRC}r-{i}.pdf" for i in range(30)]
    etags = {k: _source(s3_store, k) for k in keys}
    for key in keys[:10]:
        _result(s3_store, key, etags[key])
    # Another writer of the same manifest (a run) claims the rest while reconcile runs.
    other = _store(s3_store, lock)
    claims = [other.commit([Claim(k, etags[k], "run-live")]) for k in keys[10:]]
    report, *_ = await asyncio.gather(
        reconcile(store, source_prefix=SRC, results_prefix=RES), *claims
    )
    entries = store.read_sync().entries
    assert sorted(report.marked_done) == keys[:10]
    assert {entries[k]["status"] for k in keys[:10]} == {"done"}
    assert {entries[k]["status"] for k in keys[10:]} == {"pending"}


async def test_claims_of_runs_prefect_reports_live_are_never_released(
    s3_store: S3Store,
) -> None:
    """`--release-claims-after 0` releases every claim, except those of live runs."""
    from invoiceflow.manifest import RunLiveness

    store = _store(s3_store)
    live, ended, unknown = f"{SRC}live.pdf", f"{SRC}ended.pdf", f"{SRC}unknown.pdf"
    for key, run in ((live, "run-live"), (ended, "run-ended"), (unknown, "run-unknown")):
        await store.commit([Claim(key, _source(s3_store, key), run)])
    asked: list[set[str]] = []

    async def prefect_says(run_ids: set[str]) -> RunLiveness:
        asked.append(run_ids)
        return RunLiveness(ended=frozenset({"run-ended"}), live=frozenset({"run-live"}))

    report = await reconcile_releasing_every_claim(store, runs=prefect_says)

    assert asked == [{"run-live", "run-ended", "run-unknown"}]
    assert report.released_claims == [ended, unknown]
    snap = store.read_sync()
    assert [snap.entry(k).status for k in (live, ended, unknown)] == [  # type: ignore[union-attr]
        Status.pending,
        Status.failed,
        Status.failed,
    ]
    # With the default timeout, a fresh claim of a run Prefect cannot tell about stays.
    fresh = f"{SRC}fresh.pdf"
    await store.commit([Claim(fresh, _source(s3_store, fresh), "run-unknown")])
    again = await reconcile(store, source_prefix=SRC, results_prefix=RES, runs=prefect_says)
    assert again.released_claims == []


async def test_a_claim_taken_after_prefect_was_asked_is_not_released(
    s3_store: S3Store,
) -> None:
    """Reconcile asks Prefect outside the lock; a run claiming in between is unknown to
    the answer and must not fall to `release_claims_after=0` (a live run would lose it)."""
    from invoiceflow.manifest import RunLiveness

    store = _store(s3_store)
    old, new = f"{SRC}old.pdf", f"{SRC}new.pdf"
    await store.commit([Claim(old, _source(s3_store, old), "run-ended")])
    new_etag = _source(s3_store, new)

    async def prefect_says(run_ids: set[str]) -> RunLiveness:
        await store.commit([Claim(new, new_etag, "run-started-meanwhile")])
        return RunLiveness(ended=frozenset(run_ids))

    report = await reconcile_releasing_every_claim(store, runs=prefect_says)
    assert report.released_claims == [old]
    entry = store.read_sync().entry(new)
    assert entry is not None and entry.status is Status.pending


async def test_an_invoice_recorded_done_after_the_results_were_listed_stays_done(
    s3_store: S3Store,
) -> None:
    """Reconcile lists the results outside the lock; a run that writes a result and
    records it `done` in between keeps it done. (It became `failed`/`result_missing`
    under a running flow: the listing had no result, the manifest said done.)"""
    from invoiceflow.manifest import RunLiveness

    store = _store(s3_store)
    key = f"{SRC}late.pdf"
    etag = _source(s3_store, key)
    claimed = (await store.commit([Claim(key, etag, "run-live")]))[0]

    async def prefect_says(run_ids: set[str]) -> RunLiveness:
        result_key = _result(s3_store, key, etag)
        await store.commit(
            [Transition(key, claimed.attempt, Status.done, {"result_key": result_key})]
        )
        return RunLiveness(live=frozenset(run_ids))

    report = await reconcile_releasing_every_claim(store, runs=prefect_says)
    assert report.result_missing == []
    entry = store.read_sync().entry(key)
    assert entry is not None and entry.status is Status.done


BROKEN = {
    "invalid JSON": b'{"format": 1, "entries": {"in/',
    "a list": b'[{"in/inv-0.pdf": "done"}]',
    "wrong format": b'{"format": 99, "entries": {}}',
    "entries a list": b'{"format": 1, "entries": []}',
    "oversized": b'{"format": 1, "entries": {}, "padding": "' + b"x" * 5000 + b'"}',
    "malformed entries": None,  # readable, with bad entries under the prefix and elsewhere
}


@pytest.mark.parametrize("case", BROKEN)
async def test_rebuild_repairs_every_broken_manifest_and_rebills_nothing(
    s3_store: S3Store, case: str
) -> None:
    from invoiceflow.manifest import BACKUP_INFIX, ManifestUnreadable

    lock = asyncio.Lock()
    store = ManifestStore(s3_store, "manifest.json", lock=lambda: lock, max_bytes=4000)
    keys = [f"{SRC}inv-{i}.pdf" for i in range(4)]
    etags = {k: _source(s3_store, k) for k in keys}
    for key in keys:
        await _done(store, key, etags[key], _result(s3_store, key, etags[key]))
    if BROKEN[case] is None:
        await _raw_edit(store, lambda e: e.update({keys[0]: "done", "other/x.pdf": 7}))
    else:
        s3_store.put(store.key, BROKEN[case])
        with pytest.raises(ManifestUnreadable):
            store.read_sync()
    broken = s3_store.get(store.key).body

    report = await reconcile(store, source_prefix=SRC, results_prefix=RES, rebuild=True)

    assert report.backup_key is not None and report.backup_key.startswith(
        f"manifest.json{BACKUP_INFIX}"
    )
    assert s3_store.get(report.backup_key).body == broken  # the evidence is kept
    snap = store.read_sync()
    assert {k: snap.entries[k]["status"] for k in keys} == dict.fromkeys(keys, "done")
    if BROKEN[case] is None:
        assert report.rebuilt_invalid == [keys[0]] and report.marked_done == []
        assert snap.malformed == ["other/x.pdf"]  # another prefix's: kept for its owner
    # Nothing done is claimed (billed) again by the next run.
    outcomes = await store.commit([Claim(k, etags[k], "next-run") for k in keys])
    assert [o.reason for o in outcomes] == ["already done"] * len(keys)


async def test_rebuild_refuses_when_the_broken_manifest_cannot_be_copied(
    s3_store: S3Store, s3_endpoint: str
) -> None:
    from devtools.s3_fault_proxy import running_s3_fault_proxy
    from invoiceflow.manifest import ManifestBackupFailed
    from invoiceflow.storage import make_s3_client

    key = f"{SRC}a.pdf"
    _result(s3_store, key, _source(s3_store, key))
    s3_store.put("manifest.json", b"not json")
    with running_s3_fault_proxy(s3_endpoint) as proxy:
        proxy.add_rule(lambda r: r.method == "PUT" and BACKUP_MARK in r.path, "slowdown", times=-1)
        client = make_s3_client(
            endpoint_url=proxy.url,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            retries={"mode": "standard", "max_attempts": 1},
        )
        store = _store(S3Store(client, s3_store.bucket))
        with pytest.raises(ManifestBackupFailed, match="nothing was changed"):
            await reconcile(store, source_prefix=SRC, results_prefix=RES, rebuild=True)
    assert s3_store.get("manifest.json").body == b"not json"


BACKUP_MARK = ".broken-"


# -- end to end: real runs, the Prefect lock, the CLI ----------------------------------


@pytest.mark.e2e
def test_cli_reconcile_after_a_lost_manifest_rebills_nothing(
    local_stack: stack.StackInfo,
) -> None:
    """Flow run, manifest deleted, `invoiceflow reconcile`, rerun: nothing re-processed."""
    from support import (
        assert_invariants,
        create_lock,
        direct_s3,
        flow_params,
        good_invoices,
        run_flow,
        unique,
        upload,
    )

    from flows.cli import app

    s3 = direct_s3(local_stack.s3_endpoint, local_stack.bucket)
    prefix = unique("reconcile") + "/"
    listed = upload(s3, prefix, good_invoices(6, seed=59))
    params = flow_params(prefix, asyncio.run(create_lock(unique("lock"))))
    first = asyncio.run(run_flow(params))
    assert first.done == len(listed), first
    s3.client.delete_object(Bucket=s3.bucket, Key=params["manifest_key"])  # lost
    args = [
        "reconcile",
        "--prefix", prefix,
        "--results-prefix", params["results_prefix"],
        "--manifest-key", params["manifest_key"],
        "--manifest-lock", params["manifest_lock"],
    ]  # fmt: skip

    dry = CliRunner().invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would change 6 entries" in dry.output
    with pytest.raises(KeyError):
        s3.get(params["manifest_key"])

    real = CliRunner().invoke(app, args)
    assert real.exit_code == 0, real.output
    assert "changed 6 entries" in real.output and "marked done" in real.output
    assert_invariants(s3, params, listed)
    rerun = asyncio.run(run_flow(params))
    assert rerun.processed == 0, rerun

    missing_lock = CliRunner().invoke(app, [*args[:-1], unique("no-such-lock")])
    assert missing_lock.exit_code == 1
    assert "prefect gcl create" in " ".join(missing_lock.output.split())  # rich wraps lines


@pytest.mark.e2e
async def test_reconcile_during_a_run_loses_none_of_its_updates(
    local_stack: stack.StackInfo,
) -> None:
    from support import (
        assert_invariants,
        create_lock,
        direct_s3,
        flow_params,
        good_invoices,
        run_flow,
        unique,
        upload,
    )

    from flows.lock import manifest_lock

    s3 = direct_s3(local_stack.s3_endpoint, local_stack.bucket)
    prefix = unique("reconcile-live") + "/"
    listed = upload(s3, prefix, good_invoices(20, seed=61))
    params = flow_params(prefix, await create_lock(unique("lock")), invoices_per_task=2)
    store = ManifestStore(s3, params["manifest_key"], lock=manifest_lock(params["manifest_lock"]))

    async def reconcile_repeatedly() -> int:
        changes = 0
        for _ in range(5):
            await asyncio.sleep(0.3)
            report = await reconcile(
                store, source_prefix=prefix, results_prefix=params["results_prefix"]
            )
            changes += report.changes
        return changes

    summary, _ = await asyncio.gather(run_flow(params), reconcile_repeatedly())
    assert summary.done == len(listed), summary
    report = assert_invariants(s3, params, listed)
    assert report.done == listed


@pytest.mark.e2e
async def test_reconcile_releasing_every_claim_spares_a_running_flow(
    local_stack: stack.StackInfo,
) -> None:
    """`--release-claims-after 0` during a run: Prefect says the run is live, so none of
    its claims is released (before, each became `failed`/`abandoned` under the run)."""
    from support import (
        assert_invariants,
        create_lock,
        direct_s3,
        flow_params,
        good_invoices,
        run_flow,
        unique,
        upload,
    )

    from flows.lock import manifest_lock
    from flows.runs import flow_run_liveness

    s3 = direct_s3(local_stack.s3_endpoint, local_stack.bucket)
    prefix = unique("reconcile-spares") + "/"
    listed = upload(s3, prefix, good_invoices(20, seed=67))
    params = flow_params(prefix, await create_lock(unique("lock")), invoices_per_task=2)
    store = ManifestStore(s3, params["manifest_key"], lock=manifest_lock(params["manifest_lock"]))
    released: list[str] = []

    async def release_all_claims_repeatedly() -> None:
        for _ in range(8):
            await asyncio.sleep(0.25)
            report = await reconcile(
                store,
                source_prefix=prefix,
                results_prefix=params["results_prefix"],
                release_claims_after=dt.timedelta(0),
                runs=flow_run_liveness,
            )
            released.extend(report.released_claims)

    summary, _ = await asyncio.gather(run_flow(params), release_all_claims_repeatedly())
    assert summary.done == len(listed), summary
    assert released == []
    report = assert_invariants(s3, params, listed)
    assert report.done == listed
