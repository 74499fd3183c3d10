"""ManifestStore and GroupCommitter against a real S3 endpoint (moto server mode)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import direct_s3

from devtools.s3_fault_proxy import running_s3_fault_proxy
from invoiceflow.manifest import (
    Claim,
    Entries,
    GroupCommitter,
    ManifestStore,
    Renew,
    Status,
    Transition,
)
from invoiceflow.storage import PreconditionFailed, S3Store

KEY = "manifest.json"


def store_with(s3: S3Store, lock: asyncio.Lock | None) -> ManifestStore:
    @contextlib.asynccontextmanager
    async def acquire() -> AsyncIterator[None]:
        if lock is None:
            yield
        else:
            async with lock:
                yield

    return ManifestStore(s3, KEY, lock=acquire)


def claim(key: str, run: str = "run-a", etag: str = "e1", **kw: object) -> Claim:
    return Claim(key, etag, run, **kw)  # type: ignore[arg-type]


async def test_lifecycle_is_monotonic(s3_store: S3Store) -> None:
    store = store_with(s3_store, asyncio.Lock())
    [c] = await store.commit([claim("a.pdf")])
    assert c.applied and c.attempt == 1
    await store.commit([Transition("a.pdf", 1, Status.processing)])
    await store.commit([Transition("a.pdf", 1, Status.done, {"result_key": "results/a.json"})])
    # A late `processing` of the same attempt must not drag `done` back.
    [late] = await store.commit([Transition("a.pdf", 1, Status.processing)])
    assert not late.applied
    entry = (await store.read()).entry("a.pdf")
    assert entry is not None and entry.status is Status.done
    assert entry.result_key == "results/a.json"


async def test_superseded_attempt_cannot_finish(s3_store: S3Store) -> None:
    store = store_with(s3_store, asyncio.Lock())
    await store.commit([claim("a.pdf", run="r1")])
    # The source changed, so a new claim starts attempt 2 even though r1 holds it.
    [second] = await store.commit([claim("a.pdf", run="r2", etag="e2")])
    assert second.applied and second.attempt == 2
    [stale] = await store.commit([Transition("a.pdf", 1, Status.done)])
    assert not stale.applied and "superseded" in stale.reason
    entry = (await store.read()).entry("a.pdf")
    assert entry is not None and entry.status is Status.pending and entry.run_id == "r2"


async def test_a_transition_whose_answer_was_lost_is_still_applied(
    s3_store: S3Store, s3_endpoint: str
) -> None:
    """The write lands but its answer is lost: botocore's retry meets its own write (412).

    That write is this commit's, not another run's: the claim keeps its attempt and the
    transitions are applied, so the caller never sees its claim as lost.
    """

    with running_s3_fault_proxy(s3_endpoint) as proxy:
        store = store_with(direct_s3(proxy.url, s3_store.bucket), asyncio.Lock())
        for update in [
            claim("a.pdf"),
            Transition("a.pdf", 1, Status.processing, {"extractor": "llm"}),
            Transition("a.pdf", 1, Status.done, {"result_key": "results/a.json"}),
        ]:
            proxy.add_rule(lambda r: r.conditional_put, "reset_after")
            [outcome] = await store.commit([update])
            assert (outcome.applied, outcome.attempt) == (True, 1), outcome
        assert proxy.stats()["reset_after"] == 3
        assert (store.writes, store.conflicts) == (3, 0)
        # A transition that differs from what landed is still refused.
        [late] = await store.commit([Transition("a.pdf", 1, Status.done, {"result_key": "x"})])
        assert not late.applied and late.reason == "already done"
    entry = (await store.read()).entry("a.pdf")
    assert entry is not None and entry.status is Status.done and entry.attempts == 1


@pytest.mark.parametrize(
    ("prev_status", "transient", "selection", "expected"),
    [
        (Status.done, None, "new", False),
        (Status.done, None, "all", True),
        (Status.failed, True, "new", True),
        (Status.failed, False, "new", False),
        (Status.failed, False, "failed", True),
    ],
)
async def test_claim_rules(
    s3_store: S3Store,
    prev_status: Status,
    transient: bool | None,
    selection: str,
    expected: bool,
) -> None:
    store = store_with(s3_store, asyncio.Lock())
    await store.commit([claim("a.pdf")])
    await store.commit([Transition("a.pdf", 1, prev_status, {"transient": transient})])
    [out] = await store.commit([claim("a.pdf", run="run-b", selection=selection)])
    assert out.applied is expected


async def test_fresh_claim_of_another_run_is_respected_stale_one_is_not(
    s3_store: S3Store,
) -> None:
    store = store_with(s3_store, asyncio.Lock())
    await store.commit([claim("a.pdf", run="r1")])
    [busy] = await store.commit([claim("a.pdf", run="r2")])
    assert not busy.applied and "r1" in busy.reason
    [same_run] = await store.commit([claim("a.pdf", run="r1")])  # a retry of r1 re-claims
    assert same_run.applied and same_run.attempt == 2
    [stale] = await store.commit([claim("a.pdf", run="r3", stale_after=dt.timedelta(0))])
    assert stale.applied and stale.attempt == 3


def test_if_match_stops_a_writer_whose_read_is_stale(s3_store: S3Store) -> None:
    """The writer that lost its lease: its If-Match on an old ETag must fail."""
    first = s3_store.put_conditional(KEY, b'{"v": 1}', if_match=None)
    with pytest.raises(PreconditionFailed):
        s3_store.put_conditional(KEY, b'{"v": 0}', if_match=None)  # If-None-Match "*"
    s3_store.put_conditional(KEY, b'{"v": 2}', if_match=first)  # someone newer wrote
    with pytest.raises(PreconditionFailed):
        s3_store.put_conditional(KEY, b'{"v": "stale"}', if_match=first)
    assert json.loads(s3_store.get(KEY).body) == {"v": 2}


class InterleavingStore(S3Store):
    """Real S3 calls; an out-of-band writer gets in between every read and write.

    moto's conditional write is check-then-write, not atomic, so truly simultaneous
    writers can race inside moto itself (FIELD_NOTES); interleaving deterministically
    tests our 412 handling without testing moto's atomicity.
    """

    def __init__(self, inner: S3Store) -> None:
        super().__init__(inner.client, inner.bucket)
        self.out_of_band_keys: list[str] = []

    def put_conditional(
        self, key: str, body: bytes, *, if_match: str | None, content_type: str = "application/json"
    ) -> str:
        if len(self.out_of_band_keys) < 10:
            doc = json.loads(self.get(key).body)
            oob = f"oob-{len(self.out_of_band_keys)}"
            doc["entries"][oob] = doc["entries"]["seed.pdf"]
            doc["revision"] += 1
            super().put(key, json.dumps(doc).encode())
            self.out_of_band_keys.append(oob)
        return super().put_conditional(key, body, if_match=if_match, content_type=content_type)


async def test_conflict_is_reread_and_reapplied(s3_store: S3Store) -> None:
    """An out-of-band edit lands between each read and write: If-Match keeps both."""
    await store_with(s3_store, asyncio.Lock()).commit([claim("seed.pdf")])
    racing = InterleavingStore(s3_store)
    store = ManifestStore(racing, KEY, lock=store_with(s3_store, asyncio.Lock())._lock)
    for i in range(5):
        await store.commit([claim(f"k{i}.pdf")])
    entries = (await store.read()).entries
    assert {f"k{i}.pdf" for i in range(5)} <= entries.keys()
    assert set(racing.out_of_band_keys) <= entries.keys()
    assert store.conflicts == 10 and store.writes == 5


def unguarded_update(s3: S3Store, key: str) -> None:
    """The bug this project exists to kill: read, modify, write, no lock, no condition."""
    try:
        doc = json.loads(s3.get(KEY).body)
    except KeyError:
        doc = {"entries": {}}
    doc["entries"][key] = "done"
    s3.put(KEY, json.dumps(doc).encode())


async def test_unguarded_read_modify_write_loses_updates(s3_store: S3Store) -> None:
    n = 40
    await asyncio.gather(
        *(asyncio.to_thread(unguarded_update, s3_store, f"k{i}") for i in range(n))
    )
    kept = json.loads(s3_store.get(KEY).body)["entries"]
    assert len(kept) < n, "the race did not show; the test would not catch it"


async def test_manifest_store_loses_no_update_under_the_same_load(s3_store: S3Store) -> None:
    # Lock-free writers relying on If-Match alone are covered deterministically by
    # test_conflict_is_reread_and_reapplied: moto's conditional write is not atomic.
    store = store_with(s3_store, asyncio.Lock())
    n = 40
    await asyncio.gather(*(store.commit([claim(f"k{i}")]) for i in range(n)))
    snap = await store.read()
    assert len(snap.entries) == n
    assert snap.revision == n == store.writes


async def test_group_commit_batches_and_loses_nothing(s3_store: S3Store) -> None:
    store = store_with(s3_store, asyncio.Lock())
    k = 300
    async with GroupCommitter(store, max_batch=100, max_wait_s=0.2) as committer:
        outcomes = await asyncio.gather(*(committer.submit(claim(f"k{i}")) for i in range(k)))
    assert all(o.applied for o in outcomes)
    snap = await store.read()
    assert len(snap.entries) == k
    assert store.writes < k
    assert store.writes >= k // 100
    assert store.lock_acquisitions == store.writes == committer.batches


async def test_group_commit_acknowledges_only_after_durable(s3_store: S3Store) -> None:
    store = store_with(s3_store, asyncio.Lock())
    async with GroupCommitter(store, max_wait_s=0.3) as committer:
        fut = committer.submit_nowait(claim("a.pdf"))
        assert not fut.done()
        await fut
        # Durable: a fresh reader sees it the moment the submitter is acknowledged.
        assert store_with(s3_store, None).read_sync().entry("a.pdf") is not None


async def test_group_commit_failure_reaches_submitters_and_close(s3_store: S3Store) -> None:
    @contextlib.asynccontextmanager
    async def broken_lock() -> AsyncIterator[None]:
        raise RuntimeError("slot unavailable")
        yield

    store = ManifestStore(s3_store, KEY, lock=broken_lock)
    committer = GroupCommitter(store, max_wait_s=0)
    await committer.__aenter__()
    with pytest.raises(RuntimeError, match="slot unavailable"):
        await committer.submit(claim("a.pdf"))
    with pytest.raises(RuntimeError, match="slot unavailable"):
        await committer.close()
    assert store.read_sync().entries == {}


def test_committer_bounds_are_checked(s3_store: S3Store) -> None:
    store = store_with(s3_store, None)
    with pytest.raises(ValueError):
        GroupCommitter(store, max_batch=0)
    with pytest.raises(ValueError):
        GroupCommitter(store, max_wait_s=120)


async def test_flush_cuts_the_batch_window_short(s3_store: S3Store) -> None:
    store = store_with(s3_store, asyncio.Lock())
    async with GroupCommitter(store, max_wait_s=30) as committer:
        first = committer.submit_nowait(claim("a.pdf"))
        second = committer.submit_nowait(claim("b.pdf"))
        committer.flush()
        # Without the flush these would wait out the 30 s window.
        outcomes = await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
        assert all(o.applied for o in outcomes)
        assert store.writes == 1
        committer.flush()  # with nothing queued: no empty commit
    assert store.writes == 1


async def test_the_first_commit_windows_are_short_then_grow_to_max_wait(
    s3_store: S3Store,
) -> None:
    """A run's first LLM calls wait on their `processing` commits: the first windows are
    max_wait_s / 16, doubling, so they are not held for whole windows while slots idle."""
    store = store_with(s3_store, asyncio.Lock())
    loop = asyncio.get_running_loop()
    async with GroupCommitter(store, max_wait_s=4) as committer:
        await committer.submit(claim("a.pdf"))  # idle committer: at once
        waits = []
        for name in ("b", "c", "d", "e"):  # windows of 0.5, 1, 2, then 4 s
            started = loop.time()
            await asyncio.wait_for(committer.submit(claim(f"{name}.pdf")), timeout=20)
            waits.append(loop.time() - started)
        assert waits[0] < 2  # a full window would be 4 s
        assert waits[-1] >= 3.7  # grown to max_wait_s: at most one commit per 4 s
    assert store.writes == 5


# -- claims that live as long as their run ---------------------------------------------


async def test_another_runs_claim_is_taken_over_only_when_its_run_has_ended(
    s3_store: S3Store,
) -> None:
    store = store_with(s3_store, asyncio.Lock())
    await store.commit([claim("a.pdf", run="r1")])
    expired = dt.timedelta(0)  # the claim timeout has long passed ...
    # ... but Prefect says r1 is live: never taken over.
    [live] = await store.commit(
        [claim("a.pdf", run="r2", stale_after=expired, live_runs=frozenset({"r1"}))]
    )
    assert not live.applied and "still running" in live.reason
    # Prefect says r1 ended: taken over at once, however fresh the claim.
    [ended] = await store.commit([claim("a.pdf", run="r2", abandoned_runs=frozenset({"r1"}))])
    assert ended.applied and ended.attempt == 2
    # Prefect cannot tell about r2: only the timeout decides.
    [fresh] = await store.commit([claim("a.pdf", run="r3")])
    assert not fresh.applied and "claimed by run r2" in fresh.reason
    [stale] = await store.commit([claim("a.pdf", run="r3", stale_after=expired)])
    assert stale.applied and stale.attempt == 3


async def test_the_committer_renews_its_runs_claims_so_they_never_look_abandoned(
    s3_store: S3Store,
) -> None:
    store = store_with(s3_store, asyncio.Lock())
    timeout = dt.timedelta(seconds=1.5)
    async with GroupCommitter(store, max_wait_s=0.05, run_id="r1", renew_every_s=0.3) as mine:
        await mine.submit_many([claim("a.pdf", run="r1"), claim("b.pdf", run="r1")])
        await mine.submit(Transition("b.pdf", 1, Status.done))
        await store.commit([claim("other.pdf", run="r9")])  # not r1's: never renewed
        await asyncio.sleep(2.5)  # idle, longer than the timeout: renewals run alone
        [taken] = await store.commit([claim("a.pdf", run="r2", stale_after=timeout)])
        assert not taken.applied, taken.reason
        assert mine.renewals >= 3
    snap = store.read_sync()
    a, b, other = snap.entry("a.pdf"), snap.entry("b.pdf"), snap.entry("other.pdf")
    assert a is not None and b is not None and other is not None
    assert a.updated_at - a.created_at >= dt.timedelta(seconds=2)  # renewed
    assert b.status is Status.done and other.updated_at == other.created_at
    await asyncio.sleep(timeout.total_seconds())  # the run is gone: no more renewals
    [taken] = await store.commit([claim("a.pdf", run="r2", stale_after=timeout)])
    assert taken.applied


# -- attempt cap -----------------------------------------------------------------------


async def test_transient_failures_give_up_after_max_attempts_keeping_the_last_error(
    s3_store: S3Store,
) -> None:
    store = store_with(s3_store, asyncio.Lock())
    for attempt in range(1, 4):
        [c] = await store.commit([claim("a.pdf", run=f"r{attempt}", max_attempts=3)])
        assert c.applied and c.attempt == attempt
        failed = {"error_kind": "llm_timeout", "error_message": f"try {attempt}", "transient": True}
        await store.commit([Transition("a.pdf", attempt, Status.failed, failed)])
    [refused] = await store.commit([claim("a.pdf", run="r4", max_attempts=3)])
    assert not refused.applied and refused.reason.startswith("gave up after 3 attempts")
    entry = store.read_sync().entry("a.pdf")
    assert entry is not None
    assert (entry.status, entry.transient, entry.attempts) == (Status.gave_up, False, 3)
    assert (entry.error_kind, entry.error_message) == ("llm_timeout", "try 3")
    # Permanent for `new` runs; `failed` (an operator asking) tries once more.
    [again] = await store.commit([claim("a.pdf", run="r5", max_attempts=3)])
    assert not again.applied and "gave_up permanently" in again.reason
    [forced] = await store.commit([claim("a.pdf", run="r6", selection="failed", max_attempts=3)])
    assert forced.applied and forced.attempt == 4


async def test_an_invoice_its_runs_keep_dying_on_gives_up(s3_store: S3Store) -> None:
    store = store_with(s3_store, asyncio.Lock())
    for run in ("r1", "r2"):
        await store.commit([claim("poison.pdf", run=run, abandoned_runs=frozenset({"r1"}))])
    [out] = await store.commit(
        [claim("poison.pdf", run="r3", abandoned_runs=frozenset({"r2"}), max_attempts=2)]
    )
    assert not out.applied and out.changed
    entry = store.read_sync().entry("poison.pdf")
    assert entry is not None and entry.status is Status.gave_up
    assert entry.error_kind == "abandoned" and "r2" in (entry.error_message or "")


# -- bad data --------------------------------------------------------------------------

MALFORMED = {
    "other/str.pdf": "done",
    "other/int-number.pdf": {
        "status": "done",
        "source_etag": "e",
        "attempts": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "invoice_number": 12345,
        "vendor_name": "ACME",
    },
    "mine/touched.pdf": {"status": "finished?", "source_etag": "e1"},
}


def _put_manifest(s3: S3Store, doc: Any) -> None:
    s3.put(KEY, doc if isinstance(doc, bytes) else json.dumps(doc).encode())


async def test_malformed_entries_are_set_aside_reported_and_kept_verbatim(
    s3_store: S3Store,
) -> None:
    from invoiceflow.duplicates import RecordDone

    _put_manifest(s3_store, {"format": 1, "revision": 3, "entries": MALFORMED})
    store = store_with(s3_store, asyncio.Lock())
    snap = store.read_sync()
    assert snap.malformed == sorted(MALFORMED) == store.malformed
    assert snap.entries == {} and snap.counts()["done"] == 0
    async with GroupCommitter(store, max_wait_s=0.05) as committer:
        # A run over mine/: claim, then a done commit whose duplicate check reads
        # every done entry (an int invoice_number used to crash it).
        [c, n] = await committer.submit_many([claim("mine/touched.pdf"), claim("mine/new.pdf")])
        assert c.applied and n.applied
        fields = {"invoice_number": "12345", "vendor_name": "ACME", "result_key": "r.json"}
        done = RecordDone(Transition("mine/new.pdf", 1, Status.done, fields))
        assert (await committer.submit(done)).applied and done.duplicate_of is None
    entries = json.loads(s3_store.get(KEY).body)["entries"]
    # Untouched ones are written back exactly as they were; the touched one was re-claimed.
    assert {k: entries[k] for k in MALFORMED if k.startswith("other/")} == {
        k: v for k, v in MALFORMED.items() if k.startswith("other/")
    }
    assert entries["mine/touched.pdf"]["status"] == "pending"
    assert entries["mine/new.pdf"]["status"] == "done"
    assert store.read_sync().malformed == ["other/int-number.pdf", "other/str.pdf"]


UNREADABLE = {
    "invalid JSON": b'{"format": 1, "entries": {',
    "a list": b"[]",
    "wrong format": {"format": 2, "entries": {}},
    "no format": {"entries": {}},
    "entries a list": {"format": 1, "entries": []},
    "entries missing": {"format": 1},
    "revision a string": {"format": 1, "revision": "7", "entries": {}},
    "oversized": {"format": 1, "entries": {f"k{i}.pdf": {} for i in range(200)}},
}


@pytest.mark.parametrize("case", UNREADABLE)
async def test_an_unreadable_manifest_stops_everything_with_the_repair_command(
    s3_store: S3Store, case: str
) -> None:
    from invoiceflow.manifest import ManifestUnreadable

    _put_manifest(s3_store, UNREADABLE[case])
    before = s3_store.get(KEY)
    store = ManifestStore(s3_store, KEY, lock=asyncio.Lock, max_bytes=2000)
    for attempt in (store.read_sync, lambda: asyncio.run(store.commit([claim("a.pdf")]))):
        with pytest.raises(ManifestUnreadable) as raised:
            await asyncio.to_thread(attempt)
        assert f"invoiceflow reconcile --rebuild --manifest-key {KEY}" in str(raised.value)
    assert s3_store.get(KEY) == before  # nothing written over it
    assert store.writes == 0


# -- one builder of a done entry -------------------------------------------------------


def test_done_fields_is_what_reconcile_rebuilds_from_a_result(s3_store: S3Store) -> None:
    from decimal import Decimal

    from invoiceflow.manifest import done_fields
    from invoiceflow.reconcile import _read_result
    from invoiceflow.schema import ExtractionResult, Invoice, Usage

    result = ExtractionResult(
        source_key="in/a.pdf",
        source_etag="e1",
        extractor="openai:test",
        pages=1,
        invoice=Invoice(vendor_name="ACME", total=Decimal("9.50"), currency="EUR"),
        extracted_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        source="llm",
        usage=Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        needs_review=True,
        review_reasons=["r1"],
    )
    s3_store.put("results/a.json", result.model_dump_json().encode())
    found = _read_result(s3_store, "results/a.json")
    assert found is not None
    assert dict(found.fields) == done_fields(result, "results/a.json")
    assert found.fields["tokens_in"] == 10 and found.fields["total"] == "9.50"


# -- keys that cannot collide ----------------------------------------------------------


@pytest.mark.parametrize("source_prefix", ["", "incoming/"])
@pytest.mark.parametrize("results_prefix", ["", "results/", "incoming/"])
@pytest.mark.parametrize(
    "manifest_key", ["manifest.json", "state/manifest.json", "incoming/manifest.json", "manifest"]
)
def test_no_result_or_backup_can_collide_with_the_manifest_or_a_source(
    source_prefix: str, results_prefix: str, manifest_key: str
) -> None:
    """Every combination of empty prefixes: refused exactly when a collision is possible."""
    from pydantic import ValidationError

    from flows.params import ProcessInvoicesParams
    from invoiceflow.manifest import BACKUP_INFIX
    from invoiceflow.storage import SOURCE_SUFFIXES, invoice_id, result_key

    names = ["manifest.pdf", "manifest.xml", "state/manifest.pdf", "incoming/manifest.pdf"]
    names += [n.replace(".pdf", ".PDF") for n in names] + ["manifest.json.pdf", "a/b/c.pdf"]
    sources = [source_prefix + n for n in names]
    results = {result_key(results_prefix, invoice_id(s)) for s in sources}
    backup = f"{manifest_key}{BACKUP_INFIX}20260101T000000000000Z"

    def listed(key: str) -> bool:
        return key.startswith(source_prefix) and key.lower().endswith(SOURCE_SUFFIXES)

    # What can happen with these names (the hostile sources above are the witnesses).
    collides = manifest_key in results or listed(manifest_key)
    try:
        params = ProcessInvoicesParams(
            source_prefix=source_prefix, results_prefix=results_prefix, manifest_key=manifest_key
        )
    except ValidationError as exc:
        assert "manifest key" in str(exc)
        refused = True
    else:
        refused = False
        assert params.results_prefix == results_prefix
    if collides:
        assert refused, (source_prefix, results_prefix, manifest_key)
    if not refused:  # accepted: nothing can collide, backups included
        assert manifest_key not in results and not listed(manifest_key)
        assert backup not in results and not listed(backup)
        assert not any(listed(r) for r in results)
    # The reported break: results_prefix="" and a source manifest.pdf -> manifest.json.
    if (results_prefix, manifest_key) == ("", "manifest.json") and source_prefix == "":
        assert collides and refused


def written(entries: Entries) -> dict[str, Any]:
    """What a commit would write of `entries`, decoded (strict JSON: no duplicate keys)."""
    out = io.BytesIO()
    entries.write_members(out)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        assert len({k for k, _ in pairs}) == len(pairs), [k for k, _ in pairs]
        return dict(pairs)

    return json.loads(b"{" + out.getvalue() + b"}", object_pairs_hook=no_duplicates)


def test_finished_entries_are_kept_in_a_file_and_read_back_as_dicts() -> None:
    stamp = "2026-11-29T10:00:00Z"
    done = {"status": "done", "source_etag": "e1", "run_id": "r", "attempts": 1,
            "created_at": stamp, "updated_at": stamp, "vendor_name": "ACME GmbH"}  # fmt: skip
    live = {"status": "pending", "source_etag": "e2", "run_id": "r", "attempts": 1,
            "created_at": stamp, "updated_at": stamp}  # fmt: skip
    entries = Entries()
    entries["a.pdf"], entries["b.pdf"] = done, live

    stored = dict.__getitem__(entries, "a.pdf")
    assert type(stored) is int and sys.getsizeof(stored) < 64  # a handle into the spill file
    assert dict.__getitem__(entries, "b.pdf") is live  # live: renewals change it in place
    assert entries["a.pdf"] == entries.get("a.pdf") == done and entries.get("x") is None
    assert entries.get("x", "{}") == "{}"  # only what is stored is decoded, not a default
    assert dict(entries) == {**entries} == dict(entries.items()) == {"a.pdf": done, "b.pdf": live}
    assert list(entries.values()) == [done, live] and entries == {"a.pdf": done, "b.pdf": live}
    assert written(entries) == {"a.pdf": done, "b.pdf": live}
    # A fresh read keeps them the same way.
    assert type(dict.__getitem__(Entries.decode({"a.pdf": done}), "a.pdf")) is int

    later = dt.datetime(2026, 11, 29, 10, 5, tzinfo=dt.UTC)
    assert Renew("r").apply(entries, later).attempt == 1  # renewed: the live one only
    assert entries["b.pdf"]["updated_at"] == "2026-11-29T10:05:00Z"
    assert entries["a.pdf"] == done  # a finished entry is never renewed


@pytest.mark.parametrize("malformed", [False, True])
def test_spilled_entries_replaced_or_deleted_are_written_once_or_not_at_all(
    malformed: bool,
) -> None:
    """Past the spill's write buffer, every way to change or remove an entry is honoured
    in what a commit writes, as in what is read: nothing twice, nothing resurrected."""
    stamp = "2026-11-29T10:00:00Z"

    def entry(i: int, status: str) -> dict[str, Any]:
        return {"status": status, "source_etag": f"e{i}", "run_id": "r", "attempts": 1,
                "created_at": stamp, "updated_at": stamp, "vendor_name": "V" * 900}  # fmt: skip

    entries = Entries.decode({"odd": "kept as it is"} if malformed else {})
    expected: dict[str, Any] = {"odd": "kept as it is"} if malformed else {}
    for i in range(600):  # ~0.6 MB of members: the spill's buffer is written out twice
        entries[f"k{i}"] = expected[f"k{i}"] = entry(i, "done")
    entries["k0"] = expected["k0"] = entry(0, "failed")  # replaced by a finished one
    entries["k1"] = expected["k1"] = entry(1, "pending")  # re-claimed: back in memory
    del entries["k2"], expected["k2"]
    assert entries.pop("k3") == expected.pop("k3")  # a dict, not the stored handle
    entries.update({"k4": entry(4, "gave_up")})
    expected["k4"] = entry(4, "gave_up")
    entries |= {"k5": entry(5, "processing")}
    expected["k5"] = entry(5, "processing")
    assert entries.setdefault("k6", {}) == expected["k6"]
    entries["k599"] = expected["k599"] = entry(599, "failed")  # still in the buffer

    assert dict(entries.items()) == {k: v for k, v in expected.items() if k != "odd"}
    assert entries.copy() == dict(entries.items())
    assert written(entries) == expected
    entries.clear()
    assert written(entries) == ({"odd": "kept as it is"} if malformed else {})


def test_a_finished_entry_that_cannot_be_encoded_leaves_the_stored_one_in_place() -> None:
    stamp = "2026-11-29T10:00:00Z"
    done = {"status": "done", "source_etag": "e1", "run_id": "r", "attempts": 1,
            "created_at": stamp, "updated_at": stamp}  # fmt: skip
    entries = Entries({"a.pdf": done})
    with pytest.raises(TypeError):
        entries["a.pdf"] = {**done, "attempts": 2, "tags": {"not", "json"}}
    assert entries["a.pdf"] == done and written(entries) == {"a.pdf": done}
