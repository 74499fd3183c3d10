"""The per-invoice work of a run, free of Prefect: claim, parse, extract, record.

One invoice travels through these steps, each a small method below:

    claim     `claim`            list the prefix, claim what this run should process
    parse     `parse`            download the source; a worker process reads it
                                 (`DocumentWorkers.read`: text, OCR, e-invoice XML)
    -------   `process`, under one boundary, for each parsed invoice:
    reuse     `_written_result`  a result already written for this source and ETag? done
    start     `_start`           `processing`, committed: is the claim still this run's?
                                 (beside `reuse`, for an invoice bound for the extractor)
    extract   `_extract`         the extractor (LLM, rules) or the e-invoice XML
    validate  `validate_extraction`
    write     `_write_result`    results/<invoice>.json
    record    `_record_done`     the `done` entry, duplicate check at commit time

Any exception in any step becomes that invoice's `failed` entry (`failure_of` says
which kind, whether a retry may help, and what it cost); it never fails the run or the
other invoices. Every status change goes through the run's `GroupCommitter`, so the
manifest is written once per batch, under the lock, conditionally.

This module must not import Prefect: the flow wires these steps into tasks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from invoiceflow.documents import DocumentError, DocumentLimits, ReadDocument, read_document
from invoiceflow.duplicates import RecordDone, duplicate_reason
from invoiceflow.extractors import DocumentExtractor, Extraction, ExtractionError, ExtractionSource
from invoiceflow.manifest import (
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    Claim,
    GroupCommitter,
    Outcome,
    RunLiveness,
    RunLookup,
    Selection,
    Snapshot,
    Status,
    Transition,
    Update,
    claim_holders,
    done_fields,
)
from invoiceflow.redact import redact
from invoiceflow.results import write_result
from invoiceflow.schema import ExtractionResult, Invoice, Usage
from invoiceflow.storage import (
    FIRST_LISTING_PAGE_SIZE,
    LISTING_PAGE_SIZE,
    SOURCE_SUFFIXES,
    ListedObject,
    S3Store,
    invoice_id,
    result_key,
)
from invoiceflow.validate import validate_extraction

log = logging.getLogger(__name__)

T = TypeVar("T")

# Longest error message kept in the manifest; the run log has the rest.
MAX_MESSAGE_CHARS = 500


class RecordingStopped(Exception):
    """The manifest cannot be written any more; see `InvoicePipeline._commit`."""


class InvoiceFailed(Exception):
    """One invoice cannot be finished: a kind, a readable message, and whether to retry."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        transient: bool = False,
        usage: Usage | None = None,
        cost: Decimal | None = None,
    ) -> None:
        # Built from exceptions a provider's answer may have filled (an echoed API key):
        # masked here, before it reaches the manifest, the logs or the run's summary.
        message = redact(message)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.transient = transient
        # A failed LLM call is billed too.
        self.usage = usage if usage is not None and usage.total_tokens else None
        self.cost = cost if self.usage is not None else None


def failure_of(exc: Exception) -> InvoiceFailed:
    """The one place that says what an exception means for its invoice.

    Known failures keep their kind and retry rule. Anything else is a bug or an input
    nobody foresaw: `internal_error`, permanent, so a rerun does not bill it again and
    again; `selection="failed"` retries it after a fix.
    """
    if isinstance(exc, InvoiceFailed):
        return exc
    if isinstance(exc, ExtractionError):
        return InvoiceFailed(
            exc.kind, str(exc), transient=exc.transient, usage=exc.usage, cost=exc.cost
        )
    if isinstance(exc, DocumentError):  # unreadable, or over a time or memory budget
        return InvoiceFailed(exc.kind, exc.message, transient=exc.transient)
    if isinstance(exc, BotoCoreError | ClientError):  # after botocore's own retries
        return InvoiceFailed("s3_error", f"S3 request failed: {exc}", transient=True)
    return InvoiceFailed("internal_error", f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class WorkItem:
    """An invoice this run has claimed: attempt `attempt` of `key` at `etag`."""

    key: str
    etag: str
    size: int
    attempt: int
    invoice_id: str
    # selection="all": extract again even when a result for this source exists.
    reprocess: bool = False


@dataclass(frozen=True)
class ParsedDoc:
    """What the parse stage hands on: the read document, or why there is none."""

    item: WorkItem
    document: ReadDocument | None = None
    # Raised while downloading or reading; `process` turns it into the invoice's failure.
    error: Exception | None = None


@dataclass(frozen=True)
class InvoiceOutcome:
    key: str
    status: Status
    recorded: bool
    invoice: Invoice | None = None
    result_key: str | None = None
    error_kind: str | None = None
    error_message: str | None = None
    transient: bool = False
    usage: dict[str, int] = field(default_factory=dict)
    cost: Decimal | None = None
    cost_currency: str | None = None
    source: ExtractionSource | None = None
    needs_review: bool = False
    duplicate_of: str | None = None
    # How the fields were read: text, ocr, vision or einvoice.
    read_as: str | None = None

    @property
    def finished(self) -> bool:
        """False when this run let the invoice go (its claim was lost): not counted."""
        return self.status in (Status.done, Status.failed)


@dataclass(frozen=True)
class RunTotals:
    """Tokens, cost and review counts over a run's outcomes."""

    invoices: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Of prompt_tokens: read from the provider's prompt cache.
    cached_tokens: int = 0
    cost: Decimal | None = None
    needs_review: int = 0
    duplicates: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


def run_totals(outcomes: Iterable[InvoiceOutcome]) -> RunTotals:
    """Failed invoices count too: their tokens were billed."""
    items = [o for o in outcomes if o.finished]
    costs = [o.cost for o in items if o.cost is not None]
    return RunTotals(
        invoices=len(items),
        prompt_tokens=sum(o.usage.get("prompt_tokens", 0) for o in items),
        completion_tokens=sum(o.usage.get("completion_tokens", 0) for o in items),
        cached_tokens=sum(o.usage.get("cached_tokens", 0) for o in items),
        cost=sum(costs, Decimal(0)) if costs else None,
        needs_review=sum(o.needs_review for o in items),
        duplicates=sum(o.duplicate_of is not None for o in items),
        by_source=dict(Counter(o.source for o in items if o.source is not None)),
    )


@dataclass(frozen=True)
class PipelineConfig:
    source_prefix: str
    results_prefix: str
    run_id: str
    # Which keys under the source prefix are invoices (endings, any case).
    source_suffixes: tuple[str, ...] = SOURCE_SUFFIXES
    # Budgets for reading one document (size, pages, time, memory, OCR, vision).
    limits: DocumentLimits = field(default_factory=DocumentLimits)
    # Read embedded Factur-X/ZUGFeRD/XRechnung XML instead of calling the extractor.
    einvoice_fast_path: bool = True
    # A claim of a run the orchestrator cannot vouch for is taken over after this long.
    claim_timeout: dt.timedelta = DEFAULT_CLAIM_TIMEOUT
    # Attempts across runs before an invoice that keeps failing transiently gives up.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


def chunked(items: list[T], size: int, *, ramp: bool = False) -> list[list[T]]:
    """`items` in chunks of `size`. With `ramp`, the first chunks grow 1, 2, 4, … up to
    `size`: the first invoices reach the extractor while the bulk is still being read."""
    size, chunks, start, step = max(size, 1), [], 0, 1 if ramp else max(size, 1)
    while start < len(items):
        chunks.append(items[start : start + step])
        start += step
        step = min(step * 2, size)
    return chunks


def needs_claim(snapshot: Snapshot, key: str, etag: str, selection: Selection) -> bool:
    """Cheap pre-filter so a run over a large, mostly-done prefix sends few claims.

    Only the obvious skip (done, same source, not reprocessing everything) is decided
    here; every other case is decided by `Claim.apply` under the lock.
    """
    raw = snapshot.entries.get(key)
    if raw is not None and raw["status"] == Status.submitted:
        return False  # in a provider batch: claimable by nobody
    return not (
        raw is not None
        and raw["source_etag"] == etag
        and raw["status"] == Status.done
        and selection != "all"
    )


class InvoicePipeline:
    def __init__(
        self,
        s3: S3Store,
        committer: GroupCommitter,
        extractor: DocumentExtractor,
        config: PipelineConfig,
        runs: RunLookup | None = None,
        read: Callable[[bytes, str], ReadDocument] | None = None,
    ) -> None:
        self.s3 = s3
        self.committer = committer
        self.extractor = extractor
        self.config = config
        self.runs = runs
        # The flow passes `DocumentWorkers.read` (a bounded process pool enforcing the
        # time and memory budgets); without one, the same reader runs in this process.
        self.read = read or functools.partial(read_document, limits=config.limits)
        # The first manifest commit failure; from then on no invoice is started.
        self.stopped: Exception | None = None
        # Batch mode (invoiceflow.batch): called instead of the extractor once an invoice
        # is `processing`; queues its request for a provider batch.
        self.defer: Callable[[ParsedDoc], InvoiceOutcome] | None = None
        # Set once an invoice of the run is `processing` or finished: the flow lists and
        # claims its next page only then (`flows/tasks.py`, `parse_and_extract`).
        self.first_started = asyncio.Event()

    @property
    def lock_acquisitions(self) -> int:
        """Manifest lock acquisitions so far, counted by the store where they happen."""
        return self.committer.store.lock_acquisitions

    async def _commit(self, update: Update) -> Outcome:
        """Submit `update` and wait until it is durable.

        Once a commit has failed (the manifest lock is gone, the manifest cannot be
        written), the run starts no more invoices: their results could not be recorded.
        What is in flight finishes and keeps its result, which the next run records
        without an extractor call. The committer re-raises the failure when it closes.
        """
        if self.stopped is not None:
            raise RecordingStopped(f"not recorded: {self.stopped}")
        try:
            return await self.committer.submit(update)
        except Exception as exc:
            self.stopped = self.stopped or exc
            raise RecordingStopped(f"not recorded: {exc}") from exc

    # -- claim -------------------------------------------------------------------------

    async def claim(self, selection: Selection = "new") -> list[WorkItem]:
        """List the prefix and claim the invoices this run should process."""
        return [item async for page in self.claim_pages(selection) for item in page]

    async def claim_pages(
        self,
        selection: Selection = "new",
        *,
        page_size: int = LISTING_PAGE_SIZE,
        first_page_size: int = FIRST_LISTING_PAGE_SIZE,
        counted: Callable[[int], None] | None = None,
    ) -> AsyncIterator[list[WorkItem]]:
        """`claim`, a listing page at a time: each page is claimed (one commit) as S3
        lists it, so the first invoices are read and extracted while the rest of a
        large prefix is still being listed (S3 lists 1,000 keys a request).

        A caller that claims pages only as it needs them learns, through `counted`,
        how many the whole listing has to claim (a count made in a listing of its own,
        which keeps nothing), once its first page is claimed.
        """
        # One read, beside the first listing request: it only spares claims of what is
        # plainly done (`needs_claim`); `Claim.apply` decides on the manifest as it is
        # at each commit.
        reading = asyncio.ensure_future(self.committer.store.read())
        # Its error is raised by the `await` below; should the listing fail first, it
        # is still marked as seen (asyncio would log it as never retrieved).
        reading.add_done_callback(lambda done: done.cancelled() or done.exception())
        census: asyncio.Task[None] | None = None
        try:
            async for listed in self._listed_pages(page_size, first_page_size):
                snapshot = await reading
                yield await self.claim_listed(listed, snapshot, selection)
                if counted is not None and census is None and len(listed) >= first_page_size:
                    census = asyncio.create_task(self._count_to_claim(snapshot, selection, counted))
        finally:
            reading.cancel()
            if census is not None:
                census.cancel()

    async def _count_to_claim(
        self, snapshot: Snapshot, selection: Selection, counted: Callable[[int], None]
    ) -> None:
        total = 0
        try:
            async for listed in self._listed_pages(LISTING_PAGE_SIZE, LISTING_PAGE_SIZE):
                total += sum(needs_claim(snapshot, o.key, o.etag, selection) for o in listed)
        except Exception as exc:  # only progress depends on it
            log.warning("could not count the invoices to claim under the prefix: %s", exc)
            return
        counted(total)

    async def _listed_pages(
        self, page_size: int, first_page_size: int
    ) -> AsyncIterator[list[ListedObject]]:
        config = self.config
        pages = self.s3.list_source_pages(
            config.source_prefix,
            config.source_suffixes,
            page_size=page_size,
            first_page_size=first_page_size,
        )
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            yield page

    async def claim_listed(
        self, listed: list[ListedObject], snapshot: Snapshot, selection: Selection = "new"
    ) -> list[WorkItem]:
        """Claim, in one commit, the invoices of `listed` this run should process."""
        candidates = [o for o in listed if needs_claim(snapshot, o.key, o.etag, selection)]
        if not candidates:
            return []
        runs = await self._claim_holders(snapshot, [o.key for o in candidates])
        outcomes = await self.committer.submit_many(
            Claim(
                o.key,
                o.etag,
                self.config.run_id,
                selection,
                stale_after=self.config.claim_timeout,
                abandoned_runs=runs.ended,
                live_runs=runs.live,
                max_attempts=self.config.max_attempts,
            )
            for o in candidates
        )
        items = [
            WorkItem(o.key, o.etag, o.size, out.attempt, invoice_id(o.key), selection == "all")
            for o, out in zip(candidates, outcomes, strict=True)
            if out.applied
        ]
        # Each claimed invoice submits updates until `process` returns for it; once all
        # of them wait on a commit, the committer stops waiting out its batch window.
        self.committer.add_producers(len(items))
        return items

    async def _claim_holders(self, snapshot: Snapshot, keys: list[str]) -> RunLiveness:
        """What the orchestrator says about other runs holding claims on `keys`.

        Claims of runs that have ended are taken over now, claims of live runs never;
        only for runs it cannot tell about does the claim timeout decide.
        """
        holders = claim_holders(snapshot.entries, keys) - {self.config.run_id}
        if not holders or self.runs is None:
            return RunLiveness()
        return await self.runs(holders)

    # -- parse (blocking: runs on a worker thread) -------------------------------------

    def parse(self, item: WorkItem) -> ParsedDoc:
        """Download one source and read it; any error travels on to `process`."""
        try:
            document = self.read(self._download(item), item.key)
        except Exception as exc:
            return ParsedDoc(item, error=exc)
        return ParsedDoc(item, document=document)

    def parse_many(self, items: list[WorkItem]) -> list[ParsedDoc]:
        return [self.parse(item) for item in items]

    def _download(self, item: WorkItem) -> bytes:
        try:
            body, etag = self.s3.get(item.key, max_bytes=self.config.limits.max_bytes)
        except KeyError:
            raise InvoiceFailed(
                "source_missing", f"{item.key} disappeared before it was read", transient=True
            ) from None
        except ValueError as exc:  # over max_bytes, reported by the S3 layer
            raise InvoiceFailed("too_large", str(exc)) from None
        except (BotoCoreError, ClientError) as exc:
            raise InvoiceFailed(
                "s3_error", f"reading {item.key} failed: {exc}", transient=True
            ) from None
        if etag != item.etag:
            raise InvoiceFailed(
                "source_changed", f"{item.key} changed while being processed", transient=True
            )
        return body

    # -- process: one boundary around the rest of the invoice's path -------------------

    async def process(self, doc: ParsedDoc) -> InvoiceOutcome:
        """Finish one parsed invoice: `done` with its result, or `failed` with a reason.

        Never raises (cancellation aside): whatever happens is this invoice's outcome.
        """
        return await self._within_boundary(doc, lambda: self._process(doc), Status.pending)

    async def _within_boundary(
        self,
        doc: ParsedDoc,
        steps: Callable[[], Awaitable[InvoiceOutcome]],
        unrecorded_status: Status,
    ) -> InvoiceOutcome:
        """The per-invoice boundary: any exception of `steps` becomes this invoice's
        recorded failure; if recording itself has stopped, the outcome says so with
        `unrecorded_status`. Always tells the committer this producer is done."""
        try:
            try:
                return await steps()
            except RecordingStopped:
                raise
            except Exception as exc:
                return await self._record_failure(doc.item, failure_of(exc))
        except RecordingStopped as stopped:
            return InvoiceOutcome(
                doc.item.key, unrecorded_status, False, error_kind="not_recorded",
                error_message=str(stopped),
            )  # fmt: skip
        finally:
            self.first_started.set()
            self.committer.producer_done()

    async def _process(self, doc: ParsedDoc) -> InvoiceOutcome:
        item, document = doc.item, doc.document
        einvoice = None
        if document is not None and self.config.einvoice_fast_path:
            einvoice = document.einvoice  # exact values from the XML: no extractor call
        # An invoice bound for the extractor is started beside its result lookup: its
        # LLM call waits on both round trips. A result found makes the start moot (the
        # entry goes `processing`, then `done` with nothing billed).
        to_start = doc.error is None and einvoice is None
        written, lost = await asyncio.gather(
            self._written_result(item),
            self._start(item) if to_start else _nothing(),
            return_exceptions=True,  # both finish before either's error goes on
        )
        for step in (written, lost):
            if isinstance(step, BaseException):
                raise step
        if written is not None:
            return await self._record_done(item, written, billed=False)
        if doc.error is not None:
            raise doc.error
        assert document is not None  # a ParsedDoc has a document or an error
        if einvoice is not None:
            extraction = einvoice
        elif lost is not None:
            return lost
        elif self.defer is not None:
            return self.defer(doc)  # batch mode: its request goes into a provider batch
        else:
            extraction = await self._extract(item, document)
        return await self._finish(doc, extraction)

    async def finish(self, doc: ParsedDoc, extraction: Extraction | Exception) -> InvoiceOutcome:
        """Validate, write and record an extraction obtained elsewhere (a provider batch's
        output line), or record why there is none: the same steps and the same
        per-invoice boundary as `process`. Never raises (cancellation aside)."""

        async def steps() -> InvoiceOutcome:
            if isinstance(extraction, Exception):
                raise extraction
            return await self._finish(doc, extraction)

        return await self._within_boundary(doc, steps, Status.submitted)

    async def _finish(self, doc: ParsedDoc, extraction: Extraction) -> InvoiceOutcome:
        """validate -> write -> record, for an extraction from any source."""
        item, document = doc.item, doc.document
        assert document is not None  # a ParsedDoc has a document or an error
        result = _result(item, document, extraction)
        await self._write_result(item, result)
        return await self._record_done(item, result, billed=True)

    async def _written_result(self, item: WorkItem) -> ExtractionResult | None:
        """A result an earlier attempt wrote for this very source (same key and ETag).

        Found after a crash between the result write and the `done` commit, a lost
        manifest lock, or a deleted manifest: recorded as done with no extractor call.
        """
        if item.reprocess:
            return None
        key = self._result_key(item)
        try:
            body, _ = await asyncio.to_thread(self.s3.get, key, max_bytes=8 * 1024 * 1024)
            result = ExtractionResult.model_validate_json(body)
        except KeyError:
            return None
        except (ValueError, ValidationError) as exc:  # not one of ours: overwrite it
            log.warning("ignoring unreadable result %s: %s", key, exc)
            return None
        if (result.source_key, result.source_etag) != (item.key, item.etag):
            return None  # from an older version of the source
        return result

    async def _start(self, item: WorkItem) -> InvoiceOutcome | None:
        """Commit `processing`; the outcome to return if the claim is no longer ours.

        Awaited before any extractor call, so an invoice whose claim another run took
        over (or that reached a final state meanwhile) is never billed by this run.
        """
        outcome = await self._commit(
            Transition(
                item.key, item.attempt, Status.processing, {"extractor": self.extractor.name}
            )
        )
        if outcome.applied:
            self.first_started.set()
            return None
        log.warning("skipping %s: its claim is no longer this run's (%s)", item.key, outcome.reason)
        return InvoiceOutcome(
            item.key, Status.pending, False, error_kind="claim_lost", error_message=outcome.reason
        )

    async def _extract(self, item: WorkItem, document: ReadDocument) -> Extraction:
        # Concurrency and rate limits are the extractor's own (its provider limiter).
        # Page images go only to a vision model: a document has some only when the
        # run's limits ask for them (`DocumentLimits.vision`).
        images = {"images": document.images} if document.images else {}
        return await self.extractor.extract_document(
            document.text, pages=document.pages, invoice_key=item.key, **images
        )

    def _result_key(self, item: WorkItem) -> str:
        return result_key(self.config.results_prefix, item.invoice_id)

    async def _write_result(self, item: WorkItem, result: ExtractionResult) -> None:
        key = self._result_key(item)
        try:
            await asyncio.to_thread(write_result, self.s3, key, result)
        except (BotoCoreError, ClientError) as exc:  # after botocore's retries
            raise InvoiceFailed(
                "s3_error", f"writing {key} failed: {exc}", transient=True
            ) from None

    async def _record_done(
        self, item: WorkItem, result: ExtractionResult, *, billed: bool
    ) -> InvoiceOutcome:
        """Commit `done`; the duplicate check runs at commit time, under the lock.

        `billed` is False for a result an earlier run wrote (and paid for).
        """
        key = self._result_key(item)
        update = RecordDone(
            Transition(item.key, item.attempt, Status.done, done_fields(result, key))
        )
        outcome = await self._commit(update)
        if (duplicate := update.duplicate_of) is not None and result.duplicate_of != duplicate:
            result = await self._mark_duplicate(item, result, duplicate)
        used_tokens = billed and result.usage is not None
        return InvoiceOutcome(
            item.key,
            Status.done,
            outcome.applied,
            result.invoice,
            key,
            usage=_usage_dict(result.usage) if used_tokens else {},
            cost=result.cost if billed else None,
            cost_currency=result.cost_currency if billed else None,
            source=result.source,
            needs_review=result.needs_review or duplicate is not None,
            duplicate_of=duplicate,
            read_as=result.read_as,
        )

    async def _mark_duplicate(
        self, item: WorkItem, result: ExtractionResult, duplicate: str
    ) -> ExtractionResult:
        """Say in the result object too what the manifest already records.

        Best effort: the invoice is done either way, and the manifest entry is the
        record a person reviews.
        """
        marked = result.model_copy(
            update={
                "duplicate_of": duplicate,
                "needs_review": True,
                "review_reasons": [*result.review_reasons, duplicate_reason(duplicate)],
            }
        )
        try:
            await self._write_result(item, marked)
        except InvoiceFailed as exc:
            log.warning("%s is a duplicate of %s; %s", item.key, duplicate, exc.message)
        return marked

    async def _record_failure(self, item: WorkItem, failure: InvoiceFailed) -> InvoiceOutcome:
        log.warning("invoice %s failed (%s): %s", item.key, failure.kind, failure.message)
        fields: dict[str, Any] = {
            "error_kind": failure.kind,
            "error_message": failure.message[:MAX_MESSAGE_CHARS],
            "transient": failure.transient,
        }
        if failure.usage is not None:
            fields |= {
                "tokens_in": failure.usage.prompt_tokens,
                "tokens_out": failure.usage.completion_tokens,
                "tokens_cached": failure.usage.cached_tokens,
                "cost": str(failure.cost) if failure.cost is not None else None,
            }
        outcome = await self._commit(Transition(item.key, item.attempt, Status.failed, fields))
        return InvoiceOutcome(
            item.key,
            Status.failed,
            outcome.applied,
            error_kind=failure.kind,
            error_message=failure.message,
            transient=failure.transient,
            usage=_usage_dict(failure.usage),
            cost=failure.cost,
        )


def _result(item: WorkItem, document: ReadDocument, extraction: Extraction) -> ExtractionResult:
    """The validated result object of one invoice, every review reason included."""
    validated = validate_extraction(extraction, document.text)
    reasons = [*document.review_reasons, *validated.reasons]
    return ExtractionResult(
        source_key=item.key,
        source_etag=item.etag,
        extractor=extraction.extractor,
        pages=document.pages,
        invoice=validated.invoice,
        extracted_at=dt.datetime.now(dt.UTC),
        source=extraction.source,
        model=extraction.model,
        einvoice_format=extraction.einvoice_format,
        usage=extraction.usage if extraction.source == "llm" else None,
        cost=extraction.cost,
        cost_currency=extraction.cost_currency,
        needs_review=bool(reasons),
        review_reasons=reasons,
        truncation=extraction.truncation,
        read_as="einvoice" if extraction.source == "einvoice" else document.read_as,
    )


async def _nothing() -> None:
    return None


def _usage_dict(usage: Usage | None) -> dict[str, int]:
    if usage is None:
        return {}
    return {k: int(v) for k, v in usage.model_dump().items() if isinstance(v, int)}
