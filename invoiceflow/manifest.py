"""The manifest: one JSON object in S3 recording every invoice's status.

Two lines of defence keep concurrent writers from losing each other's updates:

1. every write happens inside an exclusive lock supplied by the caller (in the flow, a
   Prefect global concurrency limit of size one, taken with strict=True);
2. every write is conditional: If-Match on the ETag that was read, or If-None-Match "*"
   when creating. A 412 means someone wrote in between (an expired lease, an
   out-of-band edit): re-read, re-apply, retry.

Updates are small value objects applied to the freshly read manifest at commit time,
so re-applying after a conflict is always correct. Status changes are monotonic within
an attempt (pending < processing < submitted < done/failed/gave_up) and a newer attempt supersedes
an older one, so a stale `processing` can never overwrite `done`.

`GroupCommitter` batches updates from many concurrent tasks into one lock acquisition
and one conditional write per batch (group commit), acknowledging each update only
once its batch is durable in S3. It also renews the run's live claims, so a claim
never looks abandoned while its run is alive.

Bad data is contained: an entry that is not a well-formed manifest entry is set aside
at decode (kept verbatim, reported, invisible to updates) so it cannot break the
commits of runs that do not touch it; a manifest that cannot be decoded at all raises
`ManifestUnreadable`, whose message names the repair command.

This module imports nothing from Prefect: the lock is supplied by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import tempfile
from collections.abc import (
    Awaitable,
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    ValuesView,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, BinaryIO, Literal, Protocol, TypeVar

import orjson
import stamina
from pydantic import BaseModel, ValidationError

from invoiceflow.schema import ExtractionResult
from invoiceflow.spill import SpilledMembers
from invoiceflow.storage import RESULT_SUFFIX, SOURCE_SUFFIXES, PreconditionFailed, S3Store

T = TypeVar("T")

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Transient failures are retried by `new` runs up to this many attempts in all; the
# flow parameter `max_attempts` defaults to it.
DEFAULT_MAX_ATTEMPTS = 5
# A claim whose run Prefect cannot vouch for counts as abandoned after this long
# without renewal; live runs renew theirs (see `GroupCommitter`) well within it.
DEFAULT_CLAIM_TIMEOUT = dt.timedelta(minutes=15)
# Larger manifest objects are refused on read (`ManifestUnreadable`) and on write.
DEFAULT_MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class Status(StrEnum):
    pending = "pending"
    processing = "processing"
    # Sent in a provider batch (`batch_id`): claimable by nobody until `collect` records
    # its line (done/failed) or releases it (the batch expired or failed).
    submitted = "submitted"
    done = "done"
    failed = "failed"
    # A transient failure that outlived its attempt cap: permanent, last error kept.
    gave_up = "gave_up"


_RANK = {
    Status.pending: 0,
    Status.processing: 1,
    Status.submitted: 2,
    Status.done: 3,
    Status.failed: 3,
    Status.gave_up: 3,
}
LIVE = frozenset({Status.pending, Status.processing})
# No run changes these again unless it claims them anew: `Entries` keeps them encoded.
FINISHED = frozenset({Status.done, Status.failed, Status.gave_up})

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
    # Of tokens_in: served from the provider's prompt cache (billed at the cached price).
    tokens_cached: int | None = None
    cost: str | None = None
    truncated: bool | None = None
    needs_review: bool | None = None
    review_reasons: list[str] | None = None
    duplicate_of: str | None = None
    # The provider batch holding the invoice's request (batch mode), and the submission
    # that sends it: recorded before the provider is asked, so a crash in between is
    # settled by collect (invoiceflow.batch), never by sending the invoice again.
    batch_id: str | None = None
    submission_id: str | None = None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def done_fields(result: ExtractionResult, result_key: str) -> dict[str, Any]:
    """The fields of a `done` entry for `result`, stored at `result_key`.

    The one builder of a done entry: the pipeline records a finished invoice with it and
    `reconcile` rebuilds entries from result objects with it, so both always agree.
    Error fields are cleared explicitly (a retried failure becomes done).
    """
    inv = result.invoice
    usage = result.usage if result.source == "llm" else None
    return {
        "result_key": result_key,
        "extractor": result.extractor,
        "vendor_name": inv.vendor_name,
        "total": str(inv.total) if inv.total is not None else None,
        "currency": inv.currency,
        "invoice_number": inv.invoice_number,
        "vendor_tax_id": inv.vendor_tax_id,
        "source": result.source,
        "model": result.model,
        "tokens_in": usage.prompt_tokens if usage else None,
        "tokens_out": usage.completion_tokens if usage else None,
        "tokens_cached": usage.cached_tokens if usage else None,
        "cost": str(result.cost) if result.cost is not None else None,
        "truncated": result.truncation is not None,
        "needs_review": result.needs_review,
        "review_reasons": list(result.review_reasons[:5]) or None,
        "duplicate_of": result.duplicate_of,
        "error_kind": None,
        "error_message": None,
        "transient": None,
    }


@dataclass(frozen=True)
class Outcome:
    """What happened to one update at commit time.

    `applied`: the update took effect (for a `Claim`: this run now holds the invoice).
    `changed`: the update changed the manifest although it was not applied, e.g. a
    claim refused because the invoice just gave up; None means "same as applied".
    """

    applied: bool
    attempt: int = 0
    reason: str = ""
    changed: bool | None = None

    @property
    def wrote(self) -> bool:
        return self.applied if self.changed is None else self.changed


class Update(Protocol):
    key: str

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome: ...


@dataclass(frozen=True)
class RunLiveness:
    """What the orchestrator says about the runs holding claims.

    `ended`: finished for good (completed, failed, crashed, cancelled): their claims are
    dead. `live`: known and not finished: their claims are never taken over. A run in
    neither is unknown (another server, a deleted run): only the claim timeout decides.
    """

    ended: frozenset[str] = frozenset()
    live: frozenset[str] = frozenset()


# Given run ids holding claims, what the orchestrator says about them (the flow supplies
# one backed by Prefect; without one every holder is unknown).
RunLookup = Callable[[set[str]], Awaitable[RunLiveness]]


def claim_holders(entries: Mapping[str, Mapping[str, Any]], keys: Iterable[str]) -> set[str]:
    """Run ids holding live claims on `keys` (for asking the orchestrator about them)."""
    return {
        run_id
        for key in keys
        if (raw := entries.get(key)) is not None
        and raw.get("status") in LIVE
        and (run_id := raw.get("run_id"))
    }


@dataclass(frozen=True)
class Claim:
    """Take an invoice for processing by `run_id`, starting a new attempt.

    Refused when the invoice is already finished for good (per `selection`), or when
    another run holds a live claim on it. Another run's claim is taken over only when
    the orchestrator says that run has ended (`runs.ended`); while it says the run is
    live (`runs.live`) it never is; only for a run it cannot tell about does the claim
    timeout `stale_after` decide (live runs renew their claims well within it). The
    same run may always re-claim, which is what a flow retry does.

    Under `selection="new"`, an invoice that already used `max_attempts` attempts (failed
    transiently each time, or its runs died holding it) is not claimed again: its entry
    becomes `gave_up`, permanent, with its last error kept.
    """

    key: str
    source_etag: str
    run_id: str
    selection: Selection = "new"
    stale_after: dt.timedelta = DEFAULT_CLAIM_TIMEOUT
    abandoned_runs: frozenset[str] = frozenset()
    live_runs: frozenset[str] = frozenset()
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        prev = entry_or_none(entries.get(self.key))
        if prev is not None and prev.source_etag == self.source_etag:
            refusal = self._refusal(prev, now)
            if refusal:
                return Outcome(False, prev.attempts, refusal)
            if self._out_of_attempts(prev):
                return self._give_up(entries, prev, now)
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
        if prev.status is Status.submitted:  # billed once, in its batch: never again
            return f"in provider batch {prev.batch_id or f'submission {prev.submission_id}'}"
        if prev.status in LIVE:
            if prev.run_id == self.run_id or prev.run_id in self.abandoned_runs:
                return ""
            if prev.run_id in self.live_runs:
                return f"claimed by run {prev.run_id}, which is still running"
            if now - prev.updated_at < self.stale_after:
                return f"claimed by run {prev.run_id}"
            return ""
        if self.selection == "all":
            return ""
        if prev.status is Status.done:
            return "already done"
        if self.selection == "failed" or (prev.status is Status.failed and prev.transient):
            return ""
        return f"{prev.status} permanently ({prev.error_kind})"

    def _out_of_attempts(self, prev: ManifestEntry) -> bool:
        return self.selection == "new" and prev.attempts >= self.max_attempts

    def _give_up(
        self, entries: dict[str, dict[str, Any]], prev: ManifestEntry, now: dt.datetime
    ) -> Outcome:
        if prev.status in LIVE:  # its runs kept dying on it: the last error is that
            last = {
                "error_kind": "abandoned",
                "error_message": f"claimed by run {prev.run_id} and never finished",
            }
        else:
            last = {"error_kind": prev.error_kind, "error_message": prev.error_message}
        entries[self.key] = _dump(
            prev.model_copy(
                update={**last, "status": Status.gave_up, "transient": False, "updated_at": now}
            )
        )
        reason = f"gave up after {prev.attempts} attempts (last: {last['error_kind']})"
        return Outcome(False, prev.attempts, reason, changed=True)


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
        prev = entry_or_none(raw)
        if prev is None:
            return Outcome(False, 0, "entry is unreadable")
        if prev.attempts != self.attempt:
            return Outcome(False, prev.attempts, f"superseded by attempt {prev.attempts}")
        if _RANK[self.status] <= _RANK[prev.status]:
            return Outcome(False, prev.attempts, f"already {prev.status}")
        entry = prev.model_copy(update={**self.fields, "status": self.status, "updated_at": now})
        entries[self.key] = _dump(ManifestEntry.model_validate(entry.model_dump()))
        return Outcome(True, prev.attempts)


@dataclass(frozen=True)
class Renew:
    """Refresh `updated_at` of every live claim `run_id` holds, so none looks abandoned.

    The group committer adds one to a batch now and then (see `GroupCommitter`). A scan
    of the entries, but at most once per renewal interval.
    """

    run_id: str
    key: str = ""

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        stamp = now.isoformat().replace("+00:00", "Z")
        renewed = 0
        # The stored values: a finished entry kept encoded (`Entries`) is never live.
        for raw in dict.values(entries):
            if type(raw) is dict and raw.get("run_id") == self.run_id and raw.get("status") in LIVE:
                raw["updated_at"] = stamp
                renewed += 1
        return Outcome(renewed > 0, renewed)


def _dump(entry: ManifestEntry) -> dict[str, Any]:
    return entry.model_dump(mode="json", exclude_none=True)


def entry_or_none(raw: Any) -> ManifestEntry | None:
    """The entry `raw` decodes to; None when absent or not a well-formed entry."""
    if not isinstance(raw, dict):
        return None
    try:
        return ManifestEntry.model_validate(raw)
    except ValidationError:
        return None


class Entries(dict[str, dict[str, Any]]):
    """The manifest's well-formed entries, plus per-copy indexes and the set-aside rest.

    Between a run's own commits the committer reuses its decoded entries (S3 answers
    304), so an index built by the first update that needs one serves every later
    commit too; updates keep it current. A fresh read starts with no indexes.

    `malformed` holds entries that are not well-formed (a string, an int
    `invoice_number`, a missing status): kept verbatim so they are written back
    unchanged, but invisible to updates, so they cannot break a commit. A key set in
    the entries proper replaces its malformed twin on write (a run re-claimed it).

    A finished entry (`FINISHED`) is kept as JSON text in a file (`SpilledMembers`), not
    the heap, and decoded each time it is read: a run finishes its invoices and rarely
    reads them again, so the entries it holds to its end do not grow its memory (issue 13
    #4). Reads (`[]`, `get`, `values`, `items`, `pop`) return dicts; a decoded copy is
    the caller's, so changing a finished entry takes an assignment.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.indexes: dict[str, Any] = {}
        self.malformed: dict[str, Any] = {}
        self._spilled: SpilledMembers | None = None
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    @classmethod
    def decode(cls, raw: Mapping[str, Any]) -> Entries:
        entries = cls()
        for key, value in raw.items():
            if _well_formed(value):
                entries[key] = value
            else:
                entries.malformed[key] = value
        return entries

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        stored: Any = value
        if type(value) is dict and value.get("status") in FINISHED:
            if self._spilled is None:
                self._spilled = SpilledMembers()
            stored = self._spilled.add(key, orjson.dumps(value))
        # Only once the new value is stored: a value that cannot be encoded raises
        # above and leaves the old member live, so the manifest still writes it.
        self._drop_spilled(key)
        super().__setitem__(key, stored)

    def __delitem__(self, key: str) -> None:
        self._drop_spilled(key)
        super().__delitem__(key)

    def _drop_spilled(self, key: str) -> None:
        stored = dict.get(self, key)
        if type(stored) is int and self._spilled is not None:
            self._spilled.drop(stored)

    def __getitem__(self, key: str) -> dict[str, Any]:
        stored = super().__getitem__(key)
        if type(stored) is int and self._spilled is not None:
            return orjson.loads(self._spilled.value(key, stored))  # type: ignore[no-any-return]
        return stored

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default  # as given: only a stored entry is decoded

    def __iter__(self) -> Iterator[str]:
        # Not dict's own iterator, so `dict(entries)` and `{**entries}` take the slow
        # path through `__getitem__` and see dicts, never a spilled entry's handle.
        return super().__iter__()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def values(self) -> ValuesView[dict[str, Any]]:  # type: ignore[override]
        return ValuesView(self)

    def items(self) -> ItemsView[str, dict[str, Any]]:  # type: ignore[override]
        return ItemsView(self)

    # dict's own would bypass the spill: these go through the methods above.
    pop = MutableMapping.pop
    popitem = MutableMapping.popitem
    setdefault = MutableMapping.setdefault
    update = MutableMapping.update  # type: ignore[assignment]
    clear = MutableMapping.clear

    def __ior__(self, other: Any) -> Entries:  # type: ignore[override,misc]
        self.update(other)
        return self

    def copy(self) -> dict[str, dict[str, Any]]:
        return dict(self.items())

    def write_members(self, out: BinaryIO) -> None:
        """Write the entries as a JSON object's members (no braces): set-aside malformed
        ones first, then those in memory, then the spilled ones as they are."""
        in_memory = {k: v for k, v in dict.items(self) if type(v) is not int}
        if self.malformed:
            kept = {k: v for k, v in self.malformed.items() if k not in self}
            in_memory = {**kept, **in_memory}
        members = orjson.dumps(in_memory)[1:-1]
        out.write(members)
        if self._spilled is not None:
            self._spilled.copy_live(out, first=not members)


_STATUSES = frozenset(s.value for s in Status)
_TEXT_OR_NONE = frozenset({str, type(None)})


def _well_formed(value: Any) -> bool:
    """Whether the fields every run reads from any entry (claims, renewals, counts, the
    duplicate index) have their types. Cheap, as it runs on every entry at each fresh
    decode: ~0.2 s per 100,000 entries here, against ~0.85 s for the JSON parse. An entry
    a run touches is fully validated by `entry_or_none`."""
    if type(value) is not dict:
        return False
    get = value.get
    return (
        get("status") in _STATUSES
        and type(get("source_etag")) is str
        and type(get("run_id")) in _TEXT_OR_NONE
        and type(get("invoice_number")) in _TEXT_OR_NONE
    )


@dataclass(frozen=True)
class Snapshot:
    entries: dict[str, dict[str, Any]]
    etag: str | None
    revision: int

    def entry(self, key: str) -> ManifestEntry | None:
        return entry_or_none(self.entries.get(key))

    @property
    def malformed(self) -> list[str]:
        """Keys of the entries set aside as malformed, sorted."""
        return sorted(getattr(self.entries, "malformed", {}))

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for raw in self.entries.values():
            out[raw["status"]] += 1
        return out


LockFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


class ManifestTooLarge(Exception):
    pass


class ManifestUnreadable(Exception):
    """The manifest object cannot be decoded; nothing may run against it.

    Its message names the problem and the command that rebuilds the manifest from the
    result objects (after copying the broken object aside).
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(
            f"manifest {key!r} is unreadable: {problem}. No invoice was processed. Rebuild "
            f"it from the results (the broken object is copied to {key}.broken-<timestamp> "
            f"first) with: invoiceflow reconcile --rebuild --manifest-key {key} "
            "--prefix <source prefix> --results-prefix <results prefix>"
        )


class ManifestBackupFailed(RuntimeError):
    """`rebuild` could not copy the broken manifest aside, so it changed nothing."""


class ManifestLockLost(RuntimeError):
    """The manifest's lock could not be taken for a bounded time (deleted or disabled).

    Raised by the lock the caller supplies (flows/lock.py) and passed through by the
    store and the committer; its message carries the command that restores the lock.
    """


def decode_manifest(key: str, body: bytes) -> tuple[Entries, int]:
    """Entries and revision of a manifest object, or `ManifestUnreadable`.

    `{"format": 1, "entries": []}` is corrupt, not empty: only an absent object is an
    empty manifest, so a mangled one can never make a run re-bill everything.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ManifestUnreadable(key, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ManifestUnreadable(key, f"a JSON {type(doc).__name__}, not an object")
    if doc.get("format") != FORMAT_VERSION:
        raise ManifestUnreadable(
            key, f"format {doc.get('format')!r}, but this version reads format {FORMAT_VERSION}"
        )
    entries, revision = doc.get("entries"), doc.get("revision", 0)
    if not isinstance(entries, dict):
        raise ManifestUnreadable(key, f"'entries' is {type(entries).__name__}, not an object")
    if not isinstance(revision, int) or isinstance(revision, bool):
        raise ManifestUnreadable(key, f"'revision' is {revision!r}, not an integer")
    return Entries.decode(entries), revision


BACKUP_INFIX = ".broken-"


def key_collisions(
    source_prefix: str,
    results_prefix: str,
    manifest_key: str,
    source_suffixes: tuple[str, ...] = SOURCE_SUFFIXES,
) -> list[str]:
    """Why the manifest, its `.broken-*` copies, results and sources could overwrite or be
    mistaken for one another under these names; empty when they never can.

    Result keys are `<results_prefix><id>.json`, and a listing takes every key under
    `source_prefix` ending in one of `source_suffixes`. So the manifest key must not end
    like a source, and no `.json` manifest may sit under the results prefix (one could be
    overwritten by a result: `results_prefix=""` and a source `manifest.pdf` wrote
    `manifest.json`, and reconcile would read it as a result). The `.broken-<timestamp>`
    copies end in neither suffix, so they follow from the manifest key.
    """
    problems = []
    parts = manifest_key.split("/")
    if not manifest_key or manifest_key.startswith("/") or manifest_key.endswith("/"):
        problems.append(f"manifest key {manifest_key!r} must name an object, not a folder")
    if ".." in parts:
        problems.append(f"manifest key {manifest_key!r} must not contain '..'")
    if manifest_key.lower().endswith(source_suffixes):
        problems.append(
            f"manifest key {manifest_key!r} ends like a source ({', '.join(source_suffixes)}), "
            f"so a listing of {source_prefix or 'the whole bucket'!r} could take it as an invoice"
        )
    if manifest_key.startswith(results_prefix) and manifest_key.endswith(RESULT_SUFFIX):
        problems.append(
            f"manifest key {manifest_key!r} is a {RESULT_SUFFIX} object under the results "
            f"prefix {results_prefix!r}, so a result could overwrite it; move one of them"
        )
    return problems


class ManifestStore:
    """Read and conditionally write the manifest object, under an exclusive lock.

    `lock` builds the async context manager that makes a writer exclusive; in the flow
    it is Prefect's `concurrency(limit, occupy=1, strict=True)`. Counters (`writes`,
    `lock_acquisitions`, `conflicts`) feed the benchmark and the tests; `malformed`
    lists the entries the last read set aside.
    """

    def __init__(
        self,
        s3: S3Store,
        key: str,
        *,
        lock: LockFactory,
        max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
    ) -> None:
        self.s3 = s3
        self.key = key
        self._lock = lock
        self.max_bytes = max_bytes
        self._cached: Snapshot | None = None
        self._body: BinaryIO | None = None  # the file each commit's body is written to
        # The manifest's own thread: on the default executor (6 threads on 2 cores) a
        # commit queued behind hundreds of result writes and downloads at C=256, and
        # every invoice waiting on that commit stalled with it.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifest")
        self.writes = 0
        self.lock_acquisitions = 0
        self.conflicts = 0
        self.malformed: list[str] = []

    def read_sync(self) -> Snapshot:
        """A fresh, private copy of the manifest (callers may keep or mutate it)."""
        try:
            body, etag = self.s3.get(self.key, max_bytes=self.max_bytes)
        except KeyError:
            return Snapshot(Entries(), None, 0)
        except ValueError as exc:  # over max_bytes
            raise ManifestUnreadable(self.key, str(exc)) from None
        return self._decode(body, etag)

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def read(self) -> Snapshot:
        return await self._on_thread(self.read_sync)

    def _decode(self, body: bytes, etag: str) -> Snapshot:
        entries, revision = decode_manifest(self.key, body)
        if entries.malformed and sorted(entries.malformed) != self.malformed:
            keys = sorted(entries.malformed)
            log.warning(
                "manifest %s: %d malformed entries set aside (kept as they are; "
                "`invoiceflow reconcile` under their prefix rebuilds them), e.g. %s",
                self.key,
                len(keys),
                ", ".join(keys[:5]),
            )
        self.malformed = sorted(entries.malformed)
        return Snapshot(entries, etag, revision)

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
        except ValueError as exc:  # over max_bytes
            raise ManifestUnreadable(self.key, str(exc)) from None
        return cached if fresh is None else self._decode(fresh.body, fresh.etag)

    def _encode(self, snap: Snapshot, revision: int, now: dt.datetime) -> BinaryIO:
        """The manifest as it would be written, in this store's body file, rewound.

        Written piece by piece, never whole in memory: at 10,000 entries a body is 5 MB,
        and botocore reads a file in chunks to sign it and to send it.
        """
        if self._body is None:
            self._body = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as self)
        body = self._body
        body.seek(0)
        body.truncate()
        head = {"format": FORMAT_VERSION, "revision": revision, "updated_at": now.isoformat()}
        body.write(orjson.dumps(head)[:-1] + b',"entries":{')
        entries = snap.entries
        if isinstance(entries, Entries):
            entries.write_members(body)
        else:
            body.write(orjson.dumps(entries)[1:-1])
        body.write(b"}}")
        if (size := body.tell()) > self.max_bytes:
            raise ManifestTooLarge(f"manifest would be {size} bytes > {self.max_bytes}")
        body.seek(0)
        return body

    def _put(self, body: BinaryIO, *, if_match: str | None) -> str:
        """Write `body` if the object's ETag is still `if_match`; its new ETag.

        A write can land and its answer be lost (a connection reset after S3 took it).
        botocore's retry then meets that very write and gets 412. So on 412 the object
        is read back: when it is exactly `body`, the write was ours and it stands.
        """
        try:
            return self.s3.put_conditional(self.key, body, if_match=if_match)
        except PreconditionFailed:
            etag = self._etag_if_now(body)
            if etag is None:
                raise
            log.info("manifest %s: our write landed, its answer was lost", self.key)
            return etag

    def _etag_if_now(self, body: BinaryIO) -> str | None:
        """The object's ETag if it is exactly `body` now, else None.

        When it is not, the object just read is kept, decoded, as the committer's copy:
        the retry's read (`_read_for_commit`) then costs a 304, not a second download.
        """
        try:
            current, etag = self.s3.get(self.key, max_bytes=self.max_bytes)
        except (KeyError, ValueError):
            return None
        body.seek(0)
        if body.read() == current:  # whole, but only after a 412: rare under the slot
            return etag
        with contextlib.suppress(ManifestUnreadable):  # the retry's own read says so
            self._cached = self._decode(current, etag)
        return None

    def _commit_sync(self, updates: list[Update]) -> list[Outcome]:
        for attempt in stamina.retry_context(
            on=PreconditionFailed, attempts=20, wait_initial=0.02, wait_max=1.0, timeout=60
        ):
            with attempt:
                snap = self._read_for_commit()
                now = utcnow()
                outcomes = [u.apply(snap.entries, now) for u in updates]
                if not any(o.wrote for o in outcomes):
                    self._cached = snap
                    return outcomes
                body = self._encode(snap, snap.revision + 1, now)
                try:
                    etag = self._put(body, if_match=snap.etag)
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
            return await self._on_thread(self._commit_sync, batch)

    async def rebuild(self, update: Update) -> tuple[str | None, Outcome]:
        """Replace the manifest, readable or not, by what `update` makes of it.

        Under the lock: copy the current object to `<key>.broken-<timestamp>` (refusing
        to go on, with `ManifestBackupFailed`, if that copy fails), keep its well-formed
        entries if it can be decoded at all, apply `update`, and write conditionally on
        the ETag that was copied. Returns the backup key (None if there was no object).
        """
        async with self._lock():
            self.lock_acquisitions += 1
            return await self._on_thread(self._rebuild_sync, update)

    def _rebuild_sync(self, update: Update) -> tuple[str | None, Outcome]:
        now = utcnow()
        try:
            etag: str | None = self.s3.etag(self.key)
        except KeyError:
            etag = None
        backup = None
        if etag is not None:
            backup = f"{self.key}{BACKUP_INFIX}{now:%Y%m%dT%H%M%S%fZ}"
            try:
                self.s3.copy(self.key, backup, if_match=etag)
            except Exception as exc:
                raise ManifestBackupFailed(
                    f"could not copy {self.key} to {backup} ({exc}); nothing was changed"
                ) from exc
        entries, revision = self._salvage(etag)
        self._cached = None
        outcome = update.apply(entries, now)
        body = self._encode(Snapshot(entries, None, revision), revision + 1, now)
        self._put(body, if_match=etag)
        self.writes += 1
        return backup, outcome

    def _salvage(self, etag: str | None) -> tuple[Entries, int]:
        """What of the current object can be kept: its entries if it decodes at all."""
        if etag is None:
            return Entries(), 0
        try:
            body, _ = self.s3.get(self.key, max_bytes=self.max_bytes)
            return decode_manifest(self.key, body)
        except (ManifestUnreadable, ValueError, KeyError) as exc:
            log.warning("manifest %s: nothing salvaged (%s)", self.key, exc)
            return Entries(), 0

    def salvage(self) -> Entries:
        """The current entries when readable, else none (never raises `ManifestUnreadable`)."""
        try:
            etag: str | None = self.s3.etag(self.key)
        except KeyError:
            etag = None
        return self._salvage(etag)[0]


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
    A batch closes when it reaches `max_batch` updates or a window after the last
    batch that closed by time (at once when that was longer ago), bounding both the
    commit rate (each commit costs a slot round trip, ~0.1 s even uncontended) and the
    acknowledgement latency. The first window is `max_wait_s` / 16 and each one after
    doubles up to `max_wait_s`: a run's LLM calls wait on their `processing` commits,
    and with full windows from the start, all but its first call would wait one out
    while their slots sat idle (~1 s of a 64 s `make bench` run).

    With `run_id`, the committer keeps that run's claims alive: every `renew_every_s`
    it adds a `Renew` to the batch being committed, or commits one on its own when
    the run has been quiet that long (a queue of slow LLM calls), so a live run's
    claims never outgrow the claim timeout. Once the lock is lost (`ManifestLockLost`),
    every later update fails at once with it: `lock_lost` tells producers to stop.
    """

    def __init__(
        self,
        store: ManifestStore,
        *,
        max_batch: int = 1000,
        max_wait_s: float = 1.0,
        run_id: str | None = None,
        renew_every_s: float = 60.0,
    ) -> None:
        if not 1 <= max_batch <= 100_000:
            raise ValueError("max_batch must be within 1..100000")
        if not 0 <= max_wait_s <= 60:
            raise ValueError("max_wait_s must be within 0..60 seconds")
        if not 0 < renew_every_s <= 3600:
            raise ValueError("renew_every_s must be within 0..3600 seconds")
        self.store = store
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.run_id = run_id
        self.renew_every_s = renew_every_s
        # Each item is one submit (or one `submit_many`, committed whole). Sentinels:
        # None closes (submit_nowait refuses after close, so it is last); _FLUSH cuts
        # the batch being gathered short.
        self._queue: asyncio.Queue[list[_Pending] | _Flush | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._producers = 0  # see add_producers
        self._waiting = 0  # producers blocked in submit()
        self._lock_lost: ManifestLockLost | None = None
        self._renewed_at = 0.0
        self._paced_at = float("-inf")  # when the last window closed (see _gather)
        self._window_s = max_wait_s / 16  # the next window's length; doubles to max_wait_s
        self.batches = 0
        self.renewals = 0

    @property
    def lock_lost(self) -> ManifestLockLost | None:
        return self._lock_lost

    async def __aenter__(self) -> GroupCommitter:
        self._renewed_at = asyncio.get_running_loop().time()  # claims are fresh now
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
        return self._enqueue([update])[0]

    def _enqueue(self, updates: Iterable[Update]) -> list[asyncio.Future[Outcome]]:
        if self._closed:
            raise RuntimeError("committer is closed")
        loop = asyncio.get_running_loop()
        pending = [_Pending(update, loop.create_future()) for update in updates]
        self._queue.put_nowait(pending)
        return [p.future for p in pending]

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
        """Queue `updates` and wait for all of them; they are complete, so commit now,
        in one write however many they are (a run's claims)."""
        futures = self._enqueue(updates)
        self.flush()
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        closing = False
        while not closing:
            first = await self._next_or_renewal()
            if first is None:
                return
            if first is _FLUSH:
                continue  # nothing gathered yet: nothing to cut short
            batch = list(first) if isinstance(first, list) else []
            closing = await self._gather(batch)
            await self._commit(batch)

    async def _next_or_renewal(self) -> list[_Pending] | _Flush | Renew | None:
        """The next queued item, or a `Renew` when the run's claims are due for one."""
        if self.run_id is None or self.lock_lost is not None:
            return await self._queue.get()
        loop = asyncio.get_running_loop()
        remaining = self._renewed_at + self.renew_every_s - loop.time()
        try:
            return await asyncio.wait_for(self._queue.get(), max(remaining, 0))
        except TimeoutError:
            return Renew(self.run_id)

    async def _gather(self, batch: list[_Pending]) -> bool:
        """Fill `batch` until it is full or its window closes; True when closing."""
        if not batch:
            return False  # a renewal on its own: commit it now
        loop = asyncio.get_running_loop()
        # The window is paced from the last commit it closed, not from this batch's
        # first update: commits stay at most one per window, and a committer idle
        # that long commits at once (a run's first `processing` updates, which its
        # first LLM calls wait on, go out without waiting out a window).
        deadline = max(loop.time(), self._paced_at + self._window_s)
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._close_window()
                    return False
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    self._close_window()
                    return False
            if item is None:
                return True  # flush what we have now instead of waiting out the batch
            if item is _FLUSH:
                return False
            batch.extend(item)
        return False

    def _close_window(self) -> None:
        self._paced_at = asyncio.get_running_loop().time()
        self._window_s = min(self._window_s * 2, self.max_wait_s)

    def _renewal_due(self) -> list[Update]:
        if self.run_id is None:
            return []
        now = asyncio.get_running_loop().time()
        if now - self._renewed_at < self.renew_every_s:
            return []
        self._renewed_at = now
        self.renewals += 1
        return [Renew(self.run_id)]

    async def _commit(self, batch: list[_Pending]) -> None:
        if (lost := self.lock_lost) is not None:  # fail fast: waiting again won't help
            self._fail(batch, lost)
            return
        updates = [p.update for p in batch] + self._renewal_due()
        try:
            outcomes = await self.store.commit(updates)
        except Exception as exc:
            if isinstance(exc, ManifestLockLost):
                self._lock_lost = exc
            elif not batch:  # only a renewal: the next one, or the next commit, retries
                log.warning("renewing the run's claims failed: %s", exc)
                return
            log.error("manifest commit of %d updates failed: %s", len(batch), exc)
            self._failure = self._failure or exc
            self._fail(batch, exc)
            return
        self.batches += 1
        for p, outcome in zip(batch, outcomes, strict=False):
            if not p.future.done():
                p.future.set_result(outcome)

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
