"""ManifestStore and GroupCommitter against a real S3 endpoint (moto server mode)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator

import pytest

from invoiceflow.manifest import (
    Claim,
    GroupCommitter,
    ManifestStore,
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
