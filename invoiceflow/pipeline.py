"""The per-invoice work of a run, free of Prefect: select, parse, extract, record.

The flow wires these steps into tasks; the benchmark's seed contender and the tests
call them directly. Every status change goes through the run's `GroupCommitter`, so the
manifest is written once per batch, under the lock, conditionally.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from invoiceflow.duplicates import RecordDone, duplicate_reason
from invoiceflow.extractors import (
    DocumentExtractor,
    Extraction,
    ExtractionError,
    ExtractionSource,
    Extractor,
)
from invoiceflow.extractors.einvoice import read_einvoice
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
from invoiceflow.pdf import PdfError, parse_pdf
from invoiceflow.schema import ExtractionResult, Invoice, Usage
from invoiceflow.storage import S3Store, invoice_id, result_key
from invoiceflow.validate import validate_extraction

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class WorkItem:
    """An invoice this run has claimed: attempt `attempt` of `key` at `etag`."""

    key: str
    etag: str
    size: int
    attempt: int
    invoice_id: str


@dataclass(frozen=True)
class ParsedDoc:
    item: WorkItem
    text: str = ""
    pages: int = 0
    error_kind: str | None = None
    error_message: str | None = None
    transient: bool = False
    # Read from the PDF's embedded e-invoice XML: no extractor call needed.
    einvoice: Extraction | None = None


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


@dataclass(frozen=True)
class RunTotals:
    """Tokens, cost and review counts over a run's outcomes."""

    invoices: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal | None = None
    needs_review: int = 0
    duplicates: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


def run_totals(outcomes: Iterable[InvoiceOutcome]) -> RunTotals:
    """Failed invoices count too: their tokens were billed."""
    items = list(outcomes)
    costs = [o.cost for o in items if o.cost is not None]
    return RunTotals(
        invoices=len(items),
        prompt_tokens=sum(o.usage.get("prompt_tokens", 0) for o in items),
        completion_tokens=sum(o.usage.get("completion_tokens", 0) for o in items),
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
    max_concurrency: int = 8
    max_pdf_bytes: int = 20_000_000
    max_pages: int = 50
    # Read embedded Factur-X/ZUGFeRD/XRechnung XML instead of calling the extractor.
    einvoice_fast_path: bool = True
    claim_timeout: dt.timedelta = DEFAULT_CLAIM_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


def chunked(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), max(size, 1))]


def needs_claim(snapshot: Snapshot, key: str, etag: str, selection: Selection) -> bool:
    """Cheap pre-filter so a run over a large, mostly-done prefix sends few claims.

    Only the obvious skip (done, same source, not reprocessing everything) is decided
    here; every other case is decided by `Claim.apply` under the lock.
    """
    raw = snapshot.entries.get(key)
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
        extractor: Extractor,
        config: PipelineConfig,
        finished_runs: RunLookup | None = None,
    ) -> None:
        self.s3 = s3
        self.committer = committer
        self.extractor = extractor
        self.config = config
        self.finished_runs = finished_runs
        self._llm_slots = asyncio.Semaphore(config.max_concurrency)
        self._unfinished = 0  # claimed by select() and not yet recorded as done/failed

    async def select(self, selection: Selection = "new") -> list[WorkItem]:
        """List PDFs under the prefix and claim the ones this run should process."""
        prefix = self.config.source_prefix
        listed = await asyncio.to_thread(lambda: list(self.s3.list_pdfs(prefix)))
        snapshot = await self.committer.store.read()
        candidates = [o for o in listed if needs_claim(snapshot, o.key, o.etag, selection)]
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
            WorkItem(o.key, o.etag, o.size, out.attempt, invoice_id(o.key))
            for o, out in zip(candidates, outcomes, strict=True)
            if out.applied
        ]
        self._unfinished = len(items)
        return items

    async def _record_final(self, update: Update) -> Outcome:
        """Queue an invoice's final status; after the run's last one, commit at once."""
        acknowledged = self.committer.submit_nowait(update)
        self._unfinished -= 1
        if self._unfinished == 0:
            self.committer.flush()  # nothing else is coming: don't wait out the batch
        return await acknowledged

    async def _claim_holders(self, snapshot: Snapshot, keys: list[str]) -> RunLiveness:
        """What the orchestrator says about other runs holding claims on `keys`.

        Claims of runs that have ended are taken over now, claims of live runs never;
        only for runs it cannot tell about does the claim timeout decide.
        """
        holders = claim_holders(snapshot.entries, keys) - {self.config.run_id}
        if not holders or self.finished_runs is None:
            return RunLiveness()
        return await self.finished_runs(holders)

    def parse(self, item: WorkItem) -> ParsedDoc:
        """Download and parse one PDF. Blocking: run it on a worker thread."""
        try:
            body, etag = self.s3.get(item.key, max_bytes=self.config.max_pdf_bytes)
        except KeyError:
            return ParsedDoc(
                item,
                error_kind="source_missing",
                error_message=f"{item.key} disappeared before it was read",
                transient=True,
            )
        except ValueError as exc:  # over max_bytes, reported by the S3 layer
            return ParsedDoc(item, error_kind="too_large", error_message=str(exc))
        except (BotoCoreError, ClientError) as exc:
            # S3 still failing after botocore's retries: fail this invoice (a rerun
            # retries it) instead of the run, which would strand every claim it holds.
            return ParsedDoc(
                item,
                error_kind="s3_error",
                error_message=f"reading {item.key} failed: {exc}",
                transient=True,
            )
        einvoice = read_einvoice(body) if self.config.einvoice_fast_path else None
        text, pages = "", 0
        try:
            parsed = parse_pdf(
                body, max_bytes=self.config.max_pdf_bytes, max_pages=self.config.max_pages
            )
            text, pages = parsed.text, parsed.pages
        except PdfError as exc:
            if einvoice is None:  # a scanned hybrid e-invoice still has its XML
                return ParsedDoc(item, error_kind=exc.kind, error_message=str(exc))
        if etag != item.etag:
            return ParsedDoc(
                item,
                error_kind="source_changed",
                error_message=f"{item.key} changed while being processed",
                transient=True,
            )
        return ParsedDoc(item, text=text, pages=pages, einvoice=einvoice)

    def parse_many(self, items: list[WorkItem]) -> list[ParsedDoc]:
        return [self.parse(item) for item in items]

    async def extract(self, doc: ParsedDoc) -> InvoiceOutcome:
        """Extract one parsed invoice, validate it, write its result, record the outcome."""
        item = doc.item
        if doc.error_kind:
            return await self._fail(
                doc.item, doc.error_kind, doc.error_message or "", doc.transient
            )
        if doc.einvoice is not None:
            extraction = doc.einvoice  # exact values from the XML; no slot, no call
        else:
            async with self._llm_slots:
                # Fire-and-forget: monotonic transitions make a late `processing`
                # harmless, and not waiting for its commit keeps the LLM slot busy.
                _background(
                    self.committer.submit_nowait(
                        Transition(
                            item.key,
                            item.attempt,
                            Status.processing,
                            {"extractor": self.extractor.name},
                        )
                    )
                )
                try:
                    extraction = await self._call_extractor(doc)
                except ExtractionError as exc:
                    return await self._fail(
                        item, exc.kind, str(exc), exc.transient, usage=exc.usage, cost=exc.cost
                    )
                except Exception as exc:  # a bug or an unexpected library error: retryable
                    log.exception("extractor crashed on %s", item.key)
                    return await self._fail(
                        item, "internal_error", f"{type(exc).__name__}: {exc}", True
                    )
        validated = validate_extraction(extraction, doc.text)
        invoice = validated.invoice
        used_tokens = extraction.source == "llm"
        key = result_key(self.config.results_prefix, item.invoice_id)
        result = ExtractionResult(
            source_key=item.key,
            source_etag=item.etag,
            extractor=extraction.extractor,
            pages=doc.pages,
            invoice=invoice,
            extracted_at=dt.datetime.now(dt.UTC),
            source=extraction.source,
            model=extraction.model,
            einvoice_format=extraction.einvoice_format,
            usage=extraction.usage if used_tokens else None,
            cost=extraction.cost,
            cost_currency=extraction.cost_currency,
            needs_review=validated.needs_review,
            review_reasons=list(validated.reasons),
            truncation=extraction.truncation,
        )
        try:
            await asyncio.to_thread(self.s3.put, key, result.model_dump_json(indent=2).encode())
        except (BotoCoreError, ClientError) as exc:  # after botocore's retries
            return await self._fail(item, "s3_error", f"writing {key} failed: {exc}", True)
        # The duplicate check runs at commit time, under the manifest lock.
        update = RecordDone(
            Transition(item.key, item.attempt, Status.done, done_fields(result, key))
        )
        outcome = await self._record_final(update)
        if (duplicate := update.duplicate_of) is not None:
            result = result.model_copy(
                update={
                    "duplicate_of": duplicate,
                    "needs_review": True,
                    "review_reasons": [*result.review_reasons, duplicate_reason(duplicate)],
                }
            )
            await asyncio.to_thread(self.s3.put, key, result.model_dump_json(indent=2).encode())
        return InvoiceOutcome(
            item.key,
            Status.done,
            outcome.applied,
            invoice,
            key,
            usage=_usage_dict(extraction.usage) if used_tokens else {},
            cost=extraction.cost,
            cost_currency=extraction.cost_currency,
            source=extraction.source,
            needs_review=result.needs_review,
            duplicate_of=duplicate,
        )

    async def _call_extractor(self, doc: ParsedDoc) -> Extraction:
        extractor = self.extractor
        if isinstance(extractor, DocumentExtractor):
            return await extractor.extract_document(
                doc.text, pages=doc.pages, invoice_key=doc.item.key
            )
        with_usage = getattr(extractor, "extract_with_usage", None)
        if with_usage is not None:
            invoice, usage = await with_usage(doc.text, invoice_key=doc.item.key)
            return Extraction(
                invoice, "llm", extractor.name, usage=Usage.model_validate(_usage_dict(usage))
            )
        return Extraction(await extractor.extract(doc.text), "rules", extractor.name)

    async def _fail(
        self,
        item: WorkItem,
        kind: str,
        message: str,
        transient: bool,
        *,
        usage: Usage | None = None,
        cost: Decimal | None = None,
    ) -> InvoiceOutcome:
        log.warning("invoice %s failed (%s): %s", item.key, kind, message)
        fields: dict[str, Any] = {
            "error_kind": kind,
            "error_message": message[:500],
            "transient": transient,
        }
        if usage is not None and usage.total_tokens:
            # A failed call is billed too.
            fields |= {
                "tokens_in": usage.prompt_tokens,
                "tokens_out": usage.completion_tokens,
                "cost": str(cost) if cost is not None else None,
            }
        outcome = await self._record_final(
            Transition(item.key, item.attempt, Status.failed, fields)
        )
        return InvoiceOutcome(
            item.key,
            Status.failed,
            outcome.applied,
            error_kind=kind,
            error_message=message,
            transient=transient,
            usage=_usage_dict(usage) if usage is not None and usage.total_tokens else {},
            cost=cost,
        )


def _usage_dict(usage: Any) -> dict[str, int]:
    if usage is None:
        return {}
    if hasattr(usage, "model_dump"):
        usage = usage.model_dump()
    return {k: int(v) for k, v in dict(usage).items() if isinstance(v, int)}


def _background(fut: asyncio.Future[Any]) -> None:
    # The committer re-raises commit failures on close; don't also warn per future.
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
