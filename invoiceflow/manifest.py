"""The manifest: one JSON object in S3 recording every invoice's status.

Two lines of defence keep concurrent writers from losing each other's updates:

1. every write happens inside an exclusive lock supplied by the caller (in the flow, a
   Prefect global concurrency limit of size one, taken with strict=True);
2. every write is conditional: If-Match on the ETag that was read, or If-None-Match "*"
   when creating. A 412 means someone wrote in between (an expired lease, an
   out-of-band edit): re-read, re-apply, retry.

Updates are small value objects applied to the freshly read manifest at commit time,
so re-applying after a conflict is always correct. Status changes are monotonic within
an attempt (pending < processing < done/failed) and a newer attempt supersedes an older
one, so a stale `processing` can never overwrite `done`.

`GroupCommitter` batches updates from many concurrent tasks into one lock acquisition
and one conditional write per batch (group commit), acknowledging each update only
once its batch is durable in S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

import orjson
import stamina
from pydantic import BaseModel

from invoiceflow.storage import PreconditionFailed, S3Store

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class Status(StrEnum):
    pending = "pending"
    processing = "processing"
    done = "done"
    failed = "failed"


_RANK = {Status.pending: 0, Status.processing: 1, Status.done: 2, Status.failed: 2}

Selection = Literal["new", "failed", "all"]


class ManifestEntry(BaseModel):
    status: Status
    source_etag: str
    attempts: int = 0
    run_id: str | None = None
    extractor: str | None = None
    result_key: str | None = None
    error_kind: str | None = None
    error_message: str | None = None
    transient: bool | None = None
    created_at: dt.datetime
    updated_at: dt.datetime
    vendor_name: str | None = None
    total: str | None = None
    currency: str | None = None
    # Extraction details (optional; written by the pipeline when an invoice is done).
    invoice_number: str | None = None
    vendor_tax_id: str | None = None
    source: str | None = None
    model: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost: str | None = None
    truncated: bool | None = None
    needs_review: bool | None = None
    review_reasons: list[str] | None = None
    duplicate_of: str | None = None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Outcome:
    """What happened to one update at commit time."""

    applied: bool
    attempt: int = 0
    reason: str = ""


class Update(Protocol):
    key: str

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome: ...


@dataclass(frozen=True)
class Claim:
    """Take an invoice for processing by `run_id`, starting a new attempt.

    Refused when the invoice is already finished for good (per `selection`), or when
    another run holds a fresh claim on it. A claim is abandoned, and may be taken over,
    when its run is in `abandoned_runs` (the orchestrator says that run has ended:
    crashed, failed, cancelled) or is older than `stale_after` (its process died
    unnoticed). The same run may always re-claim, which is what a flow retry does.
    """

    key: str
    source_etag: str
    run_id: str
    selection: Selection = "new"
    stale_after: dt.timedelta = dt.timedelta(minutes=15)
    abandoned_runs: frozenset[str] = frozenset()

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        raw = entries.get(self.key)
        prev = ManifestEntry.model_validate(raw) if raw is not None else None
        if prev is not None and prev.source_etag == self.source_etag:
            refusal = self._refusal(prev, now)
            if refusal:
                return Outcome(False, prev.attempts, refusal)
        attempts = (prev.attempts if prev else 0) + 1
        entries[self.key] = ManifestEntry(
            status=Status.pending,
            source_etag=self.source_etag,
            attempts=attempts,
            run_id=self.run_id,
            created_at=prev.created_at if prev else now,
            updated_at=now,
        ).model_dump(mode="json", exclude_none=True)
        return Outcome(True, attempts)

    def _refusal(self, prev: ManifestEntry, now: dt.datetime) -> str:
        if prev.status in (Status.pending, Status.processing):
            live = prev.run_id not in self.abandoned_runs
            if prev.run_id != self.run_id and live and now - prev.updated_at < self.stale_after:
                return f"claimed by run {prev.run_id}"
            return ""
        if self.selection == "all":
            return ""
        if prev.status is Status.done:
            return "already done"
        if self.selection == "failed" or prev.transient:
            return ""
        return f"failed permanently ({prev.error_kind})"


@dataclass(frozen=True)
class Transition:
    """Move the entry of attempt `attempt` forward to `status` (never backwards)."""

    key: str
    attempt: int
    status: Status
    fields: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        raw = entries.get(self.key)
        if raw is None:
            return Outcome(False, 0, "no such entry")
        prev = ManifestEntry.model_validate(raw)
        if prev.attempts != self.attempt:
            return Outcome(False, prev.attempts, f"superseded by attempt {prev.attempts}")
        if _RANK[self.status] <= _RANK[prev.status]:
            return Outcome(False, prev.attempts, f"already {prev.status}")
        entry = prev.model_copy(update={**self.fields, "status": self.status, "updated_at": now})
        entries[self.key] = ManifestEntry.model_validate(entry.model_dump()).model_dump(
            mode="json", exclude_none=True
        )
        return Outcome(True, prev.attempts)


class Entries(dict[str, dict[str, Any]]):
    """The manifest's entries, plus indexes that updates build once per decoded copy.

    Between a run's own commits the committer reuses its decoded entries (S3 answers
    304), so an index built by the first update that needs one serves every later
    commit too; updates keep it current. A fresh read starts with no indexes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.indexes: dict[str, Any] = {}


@dataclass(frozen=True)
class Snapshot:
    entries: dict[str, dict[str, Any]]
    etag: str | None
    revision: int

    def entry(self, key: str) -> ManifestEntry | None:
        raw = self.entries.get(key)
        return ManifestEntry.model_validate(raw) if raw is not None else None

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for raw in self.entries.values():
            out[raw["status"]] += 1
        return out


LockFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


class ManifestTooLarge(Exception):
    pass


class ManifestStore:
    """Read and conditionally write the manifest object, under an exclusive lock.

    `lock` builds the async context manager that makes a writer exclusive; in the flow
    it is Prefect's `concurrency(limit, occupy=1, strict=True)`. Counters (`writes`,
    `lock_acquisitions`, `conflicts`) feed the benchmark and the tests.
    """

    def __init__(
        self,
        s3: S3Store,
        key: str,
        *,
        lock: LockFactory,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.s3 = s3
        self.key = key
        self._lock = lock
        self.max_bytes = max_bytes
        self._cached: Snapshot | None = None
        self.writes = 0
        self.lock_acquisitions = 0
        self.conflicts = 0

    def read_sync(self) -> Snapshot:
        """A fresh, private copy of the manifest (callers may keep or mutate it)."""
        try:
            body, etag = self.s3.get(self.key, max_bytes=self.max_bytes)
        except KeyError:
            return Snapshot(Entries(), None, 0)
        return self._decode(body, etag)

    async def read(self) -> Snapshot:
        return await asyncio.to_thread(self.read_sync)

    def _decode(self, body: bytes, etag: str) -> Snapshot:
        doc = orjson.loads(body)
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"manifest {self.key} has unknown format {doc.get('format')!r}")
        return Snapshot(Entries(doc["entries"]), etag, doc.get("revision", 0))

    def _read_for_commit(self) -> Snapshot:
        """The committer's copy, re-downloaded only when someone else wrote since.

        At 100,000 entries the download and parse are most of a commit's cost, and
        between one run's own commits the object usually has not changed.
        """
        cached = self._cached
        self._cached = None  # whatever happens next, a half-applied copy is never reused
        if cached is None or cached.etag is None:
            return self.read_sync()
        try:
            fresh = self.s3.get_if_changed(self.key, cached.etag, max_bytes=self.max_bytes)
        except KeyError:
            return Snapshot(Entries(), None, 0)
        return cached if fresh is None else self._decode(fresh.body, fresh.etag)

    def _encode(self, snap: Snapshot, revision: int, now: dt.datetime) -> bytes:
        doc = {
            "format": FORMAT_VERSION,
            "revision": revision,
            "updated_at": now.isoformat(),
            "entries": snap.entries,
        }
        body = orjson.dumps(doc)
        if len(body) > self.max_bytes:
            raise ManifestTooLarge(f"manifest would be {len(body)} bytes > {self.max_bytes}")
        return body

    def _commit_sync(self, updates: list[Update]) -> list[Outcome]:
        for attempt in stamina.retry_context(
            on=PreconditionFailed, attempts=20, wait_initial=0.02, wait_max=1.0, timeout=60
        ):
            with attempt:
                snap = self._read_for_commit()
                now = utcnow()
                outcomes = [u.apply(snap.entries, now) for u in updates]
                if not any(o.applied for o in outcomes):
                    self._cached = snap
                    return outcomes
                body = self._encode(snap, snap.revision + 1, now)
                try:
                    etag = self.s3.put_conditional(self.key, body, if_match=snap.etag)
                except PreconditionFailed:
                    self.conflicts += 1
                    log.warning("manifest %s changed under us; re-reading", self.key)
                    raise
                self.writes += 1
                self._cached = Snapshot(snap.entries, etag, snap.revision + 1)
                return outcomes
        raise AssertionError("unreachable")  # stamina re-raises after the last attempt

    async def commit(self, updates: Iterable[Update]) -> list[Outcome]:
        """Apply `updates` atomically: one lock acquisition, one conditional write."""
        batch = list(updates)
        if not batch:
            return []
        async with self._lock():
            self.lock_acquisitions += 1
            return await asyncio.to_thread(self._commit_sync, batch)


class _Flush:
    pass


_FLUSH = _Flush()


@dataclass
class _Pending:
    update: Update
    future: asyncio.Future[Outcome]


class GroupCommitter:
    """Group commit for one flow run: many concurrent updates, few manifest writes.

    `submit` queues an update and returns once the batch holding it is durable.
    A batch closes when it reaches `max_batch` updates or `max_wait_s` after its first
    update arrived, bounding both the commit rate (each commit costs a slot round trip,
    ~0.1 s even uncontended) and the acknowledgement latency.
    """

    def __init__(
        self, store: ManifestStore, *, max_batch: int = 1000, max_wait_s: float = 1.0
    ) -> None:
        if not 1 <= max_batch <= 100_000:
            raise ValueError("max_batch must be within 1..100000")
        if not 0 <= max_wait_s <= 60:
            raise ValueError("max_wait_s must be within 0..60 seconds")
        self.store = store
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # Sentinels: None closes (submit_nowait refuses after close, so it is last);
        # _FLUSH cuts the batch being gathered short.
        self._queue: asyncio.Queue[_Pending | _Flush | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._producers = 0  # see add_producers
        self._waiting = 0  # producers blocked in submit()
        self.batches = 0

    async def __aenter__(self) -> GroupCommitter:
        self._worker = asyncio.create_task(self._run(), name="manifest-group-commit")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush everything queued, stop, and re-raise any commit failure."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
        if self._worker is not None:
            await self._worker
            self._worker = None
        if self._failure is not None:
            raise self._failure

    def submit_nowait(self, update: Update) -> asyncio.Future[Outcome]:
        """Queue `update`; the future resolves once its batch is durable."""
        if self._closed:
            raise RuntimeError("committer is closed")
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(update, fut))
        return fut

    async def submit(self, update: Update) -> Outcome:
        """Queue `update` and wait until its batch is durable."""
        fut = self.submit_nowait(update)
        self._waiting += 1
        self._flush_if_all_wait()
        try:
            return await fut
        finally:
            self._waiting -= 1

    def add_producers(self, n: int) -> None:
        """`n` more producers (a run's claimed invoices) will `submit` until `producer_done`.

        When every open producer is waiting in `submit`, nothing else can arrive, so
        the batch is committed at once instead of after `max_wait_s`: the run's last
        invoice, or a run whose invoices all wait for their `processing` commit.
        """
        self._producers += n

    def producer_done(self) -> None:
        self._producers = max(0, self._producers - 1)
        self._flush_if_all_wait()

    def _flush_if_all_wait(self) -> None:
        if self._producers and self._waiting >= self._producers and not self._closed:
            self.flush()

    def flush(self) -> None:
        """Commit what is queued now rather than after `max_wait_s`."""
        self._queue.put_nowait(_FLUSH)

    async def submit_many(self, updates: Iterable[Update]) -> list[Outcome]:
        """Queue `updates` and wait for all of them; they are complete, so commit now."""
        futures = [self.submit_nowait(u) for u in updates]
        self.flush()
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        closing = False
        while not closing:
            first = await self._queue.get()
            if first is None:
                return
            if first is _FLUSH:
                continue  # nothing gathered yet: nothing to cut short
            batch = [first]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is None:
                    closing = True  # flush what we have now instead of waiting out the batch
                    break
                if item is _FLUSH:
                    break
                batch.append(item)
            await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            outcomes = await self.store.commit(p.update for p in batch)
        except Exception as exc:
            log.error("manifest commit of %d updates failed: %s", len(batch), exc)
            self._failure = self._failure or exc
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.batches += 1
        for p, outcome in zip(batch, outcomes, strict=True):
            if not p.future.done():
                p.future.set_result(outcome)
