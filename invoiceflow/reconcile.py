"""Rebuild or repair the manifest from the result objects and the source listing.

The result objects are the durable record of finished work (each names its source key
and ETag), and the listing says what exists now. After a crash, a lost or hand-edited
manifest, or results copied in from elsewhere, `reconcile` brings the manifest entries
under one source prefix back in line with both:

=====================  ==================================================================
finding                repair
=====================  ==================================================================
result matches source  entry becomes ``done`` from the result (missing, not done, wrong
(same key and ETag)    result key, or from an older source version) — a crash between
                       the result write and the manifest commit, or a lost manifest
done, no such result   ``failed`` (transient, ``result_missing``): the next run redoes it;
                       not when recorded done after the results were listed (a run
                       finishing it meanwhile): the next reconcile decides
claim never finished   ``failed`` (transient, ``abandoned``) when Prefect says its run
                       has ended, or, for a run Prefect cannot tell about, when older
                       than ``release_claims_after`` (default 15 minutes, the claim
                       timeout). A claim of a run Prefect reports live is never released.
malformed entry        dropped and rebuilt from the result, if any (a bad manual edit)
source gone            reported; removed with ``prune``
result without source  reported (never deleted)
=====================  ==================================================================

Entries outside the prefix are never touched. Entries whose source changed since
(different ETag) and ``failed`` entries are left alone: the next run decides.

`Reconcile` is a manifest `Update`, so it is applied by `ManifestStore.commit`: under
the manifest lock, to the manifest as it is at that moment, with one conditional write.
A run that commits in between is therefore never overwritten, only reconciled.

With ``rebuild``, an unreadable manifest (invalid JSON, wrong type or format, oversized,
``entries`` not an object) is replaced instead: `ManifestStore.rebuild` first copies it
to ``<key>.broken-<timestamp>`` and stops if that copy fails, keeps whatever entries
still decode, and this update rebuilds the prefix's entries from the results.

Imports nothing from Prefect.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from invoiceflow.manifest import (
    LIVE,
    ManifestEntry,
    ManifestStore,
    Outcome,
    RunLiveness,
    RunLookup,
    Status,
    claim_holders,
    done_fields,
    utcnow,
)
from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import S3Store, invoice_id, result_key

log = logging.getLogger(__name__)

# A result object is a few KB; anything far larger is not one of ours.
MAX_RESULT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class FoundResult:
    """One result object, reduced to what the manifest records."""

    key: str
    source_key: str
    source_etag: str
    fields: Mapping[str, Any]
    extracted_at: dt.datetime


@dataclass
class ReconcileReport:
    """What a reconcile found and changed (key lists, sorted)."""

    marked_done: list[str] = field(default_factory=list)
    result_missing: list[str] = field(default_factory=list)
    released_claims: list[str] = field(default_factory=list)
    rebuilt_invalid: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    orphaned_entries: list[str] = field(default_factory=list)
    orphaned_results: list[str] = field(default_factory=list)
    unreadable_results: list[str] = field(default_factory=list)
    unchanged: int = 0
    # `rebuild`: where the replaced manifest object was copied (None: there was none).
    backup_key: str | None = None

    @property
    def changes(self) -> int:
        return (
            len(self.marked_done)
            + len(self.result_missing)
            + len(self.released_claims)
            + len(self.rebuilt_invalid)
            + len(self.pruned)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "marked_done": self.marked_done,
            "result_missing": self.result_missing,
            "released_claims": self.released_claims,
            "rebuilt_invalid": self.rebuilt_invalid,
            "pruned": self.pruned,
            "orphaned_entries": self.orphaned_entries,
            "orphaned_results": self.orphaned_results,
            "unreadable_results": self.unreadable_results,
            "unchanged": self.unchanged,
            "changes": self.changes,
            "backup_key": self.backup_key,
        }


@dataclass
class Reconcile:
    """The manifest `Update` that repairs the entries under `source_prefix`.

    `apply` may run more than once (a conflicting write makes the store re-read and
    re-apply), so it rebuilds `report` from scratch every time.
    """

    source_prefix: str
    listing: Mapping[str, str]
    """Source key -> current ETag, for every PDF under the prefix."""
    results: Mapping[str, FoundResult]
    """Source key -> its best result object."""
    orphaned_results: list[str] = field(default_factory=list)
    unreadable_results: list[str] = field(default_factory=list)
    release_claims_after: dt.timedelta | None = dt.timedelta(minutes=15)
    prune: bool = False
    runs: RunLiveness = field(default_factory=RunLiveness)
    """What Prefect says about the runs holding claims under the prefix."""
    asked_about: frozenset[str] | None = None
    """The runs `runs` answers for (None: nobody was asked, the timeout decides). A claim
    taken after the question, by a run not asked about, is left for the next reconcile."""
    planned_at: dt.datetime | None = None
    """When the results were listed: an entry recorded `done` since may have a result
    the listing missed, so it is left for the next reconcile, never failed."""
    report: ReconcileReport = field(default_factory=ReconcileReport)

    @property
    def key(self) -> str:
        return self.source_prefix

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        report = ReconcileReport(
            orphaned_results=sorted(self.orphaned_results),
            unreadable_results=sorted(self.unreadable_results),
        )
        malformed: dict[str, Any] = getattr(entries, "malformed", {})  # on manifest.Entries
        for key in [k for k in malformed if k.startswith(self.source_prefix)]:
            del malformed[key]  # set aside at decode: dropped here, rebuilt below
            report.rebuilt_invalid.append(key)
        keys = set(self.listing) | {k for k in entries if k.startswith(self.source_prefix)}
        for key in sorted(keys | set(report.rebuilt_invalid)):
            self._reconcile_one(key, entries, now, report)
        report.rebuilt_invalid.sort()
        self.report = report
        return Outcome(report.changes > 0, 0, "" if report.changes else "nothing to repair")

    def _reconcile_one(
        self, key: str, entries: dict[str, dict[str, Any]], now: dt.datetime, r: ReconcileReport
    ) -> None:
        entry: ManifestEntry | None = None
        if (raw := entries.get(key)) is not None:
            try:
                entry = ManifestEntry.model_validate(raw)
            except ValidationError:
                del entries[key]
                r.rebuilt_invalid.append(key)
        etag = self.listing.get(key)
        if etag is None:  # the source is gone
            if entry is not None:
                if self.prune:
                    del entries[key]
                    r.pruned.append(key)
                else:
                    r.orphaned_entries.append(key)
            return
        found = self.results.get(key)
        if found is not None and found.source_etag == etag:
            self._record_done(key, entry, found, entries, now, r)
            return
        if entry is None:
            return  # never seen, or its entry was unreadable: the next run claims it
        if entry.source_etag != etag:
            r.unchanged += 1  # the source changed since: the next run claims it
            return
        if entry.status is Status.done and self._newer_than_the_listing(entry):
            r.unchanged += 1
        elif entry.status is Status.done:
            what = "points at a result that is missing" if found is None else "has a stale result"
            self._fail(entries, key, entry, now, "result_missing", f"manifest said done but {what}")
            r.result_missing.append(key)
        elif entry.status in LIVE and self._abandoned(entry, now):
            message = (
                f"claimed by run {entry.run_id} at {entry.updated_at:%Y-%m-%d %H:%M:%S}Z "
                "and never finished (released by reconcile)"
            )
            self._fail(entries, key, entry, now, "abandoned", message)
            r.released_claims.append(key)
        else:
            r.unchanged += 1

    @staticmethod
    def _record_done(
        key: str,
        entry: ManifestEntry | None,
        found: FoundResult,
        entries: dict[str, dict[str, Any]],
        now: dt.datetime,
        r: ReconcileReport,
    ) -> None:
        """`key` is done from `found`, a result for its current source (unless it is)."""
        if (
            entry is not None
            and entry.source_etag == found.source_etag
            and entry.status is Status.done
            and entry.result_key == found.key
        ):
            r.unchanged += 1
            return
        entries[key] = _dump(
            ManifestEntry(
                status=Status.done,
                source_etag=found.source_etag,
                attempts=max(entry.attempts, 1) if entry is not None else 1,
                run_id=entry.run_id if entry is not None else None,
                created_at=entry.created_at if entry is not None else found.extracted_at,
                updated_at=now,
                **{k: v for k, v in found.fields.items() if v is not None},
            )
        )
        if key not in r.rebuilt_invalid:
            r.marked_done.append(key)

    def _newer_than_the_listing(self, entry: ManifestEntry) -> bool:
        return self.planned_at is not None and entry.updated_at >= self.planned_at

    def _abandoned(self, entry: ManifestEntry, now: dt.datetime) -> bool:
        """A claim nobody will finish: its run ended, or it is unknown and timed out."""
        if entry.run_id in self.runs.live:
            return False
        if entry.run_id in self.runs.ended:
            return True
        if self.asked_about is not None and entry.run_id not in self.asked_about:
            return False
        timeout = self.release_claims_after
        return timeout is not None and now - entry.updated_at >= timeout

    @staticmethod
    def _fail(
        entries: dict[str, dict[str, Any]],
        key: str,
        entry: ManifestEntry,
        now: dt.datetime,
        kind: str,
        message: str,
    ) -> None:
        # Transient, so the next `new` run picks it up; result fields are cleared.
        entries[key] = _dump(
            ManifestEntry(
                status=Status.failed,
                source_etag=entry.source_etag,
                attempts=entry.attempts,
                run_id=entry.run_id,
                created_at=entry.created_at,
                updated_at=now,
                error_kind=kind,
                error_message=message,
                transient=True,
            )
        )


def _dump(entry: ManifestEntry) -> dict[str, Any]:
    return entry.model_dump(mode="json", exclude_none=True)


def _list_json(s3: S3Store, prefix: str) -> Iterator[str]:
    paginator = s3.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=s3.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".json"):
                yield obj["Key"]


def _read_result(s3: S3Store, key: str) -> FoundResult | None:
    try:
        body, _ = s3.get(key, max_bytes=MAX_RESULT_BYTES)
        result = ExtractionResult.model_validate_json(body)
    except (KeyError, ValueError, ValidationError, json.JSONDecodeError):
        return None
    return FoundResult(
        key,
        result.source_key,
        result.source_etag,
        done_fields(result, key),
        result.extracted_at,
    )


def plan(
    s3: S3Store,
    *,
    source_prefix: str,
    results_prefix: str,
    release_claims_after: dt.timedelta | None = dt.timedelta(minutes=15),
    prune: bool = False,
    max_workers: int = 16,
) -> Reconcile:
    """List the sources and read every result under `results_prefix` (I/O, no lock)."""
    planned_at = utcnow()
    listing = {o.key: o.etag for o in s3.list_sources(source_prefix)}
    result_keys = list(_list_json(s3, results_prefix))
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        read = list(pool.map(lambda k: (k, _read_result(s3, k)), result_keys))
    results: dict[str, FoundResult] = {}
    orphans, unreadable = [], []
    for key, found in read:
        if found is None:
            unreadable.append(key)
        elif found.source_key not in listing:
            if found.source_key.startswith(source_prefix):
                orphans.append(key)
        elif _better(found, results.get(found.source_key), listing[found.source_key]):
            results[found.source_key] = found
    return Reconcile(
        source_prefix,
        listing,
        results,
        orphaned_results=orphans,
        unreadable_results=unreadable,
        release_claims_after=release_claims_after,
        prune=prune,
        planned_at=planned_at,
    )


def _better(candidate: FoundResult, current: FoundResult | None, etag: str) -> bool:
    """Of two results for one source: the one for its current ETag, then the canonical
    key (where the pipeline writes today), then the newest."""
    if current is None:
        return True

    def rank(f: FoundResult) -> tuple[bool, bool, dt.datetime]:
        canonical = f.key.endswith(f"/{invoice_id(f.source_key)}.json")
        return (f.source_etag == etag, canonical, f.extracted_at)

    return rank(candidate) > rank(current)


async def reconcile(
    store: ManifestStore,
    *,
    source_prefix: str,
    results_prefix: str,
    release_claims_after: dt.timedelta | None = dt.timedelta(minutes=15),
    prune: bool = False,
    dry_run: bool = False,
    rebuild: bool = False,
    runs: RunLookup | None = None,
) -> ReconcileReport:
    """Plan from S3, then apply under the store's lock with one conditional write.

    `runs` tells which runs holding claims under the prefix have ended or are live
    (the CLI asks Prefect); without it only `release_claims_after` decides. With
    `rebuild`, the manifest is replaced even when unreadable, after a backup copy
    (`ManifestStore.rebuild`). With `dry_run`, the repair is applied to a private copy
    of the manifest and nothing is written.
    """
    update = await asyncio.to_thread(
        plan,
        store.s3,
        source_prefix=source_prefix,
        results_prefix=results_prefix,
        release_claims_after=release_claims_after,
        prune=prune,
    )
    if runs is not None:
        entries = await asyncio.to_thread(store.salvage)
        holders = claim_holders(entries, [k for k in entries if k.startswith(source_prefix)])
        update.runs = await runs(holders) if holders else RunLiveness()
        update.asked_about = frozenset(holders)
    if dry_run:
        copy = await asyncio.to_thread(store.salvage) if rebuild else (await store.read()).entries
        update.apply(copy, utcnow())
    elif rebuild:
        backup, _ = await store.rebuild(update)
        update.report.backup_key = backup
    else:
        await store.commit([update])
    return update.report


def canonical_result_key(results_prefix: str, source_key: str) -> str:
    """Where the pipeline writes the result of `source_key`."""
    return result_key(results_prefix, invoice_id(source_key))
