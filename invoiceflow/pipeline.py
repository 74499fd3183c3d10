"""The per-invoice work of a run, free of Prefect: select, parse, extract, record.

The flow wires these steps into tasks; the benchmark's seed contender and the tests
call them directly. Every status change goes through the run's `GroupCommitter`, so the
manifest is written once per batch, under the lock, conditionally.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

from invoiceflow.extractors import ExtractionError, Extractor
from invoiceflow.manifest import Claim, GroupCommitter, Selection, Snapshot, Status, Transition
from invoiceflow.pdf import PdfError, parse_pdf
from invoiceflow.schema import ExtractionResult, Invoice
from invoiceflow.storage import S3Store, invoice_id, result_key

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


@dataclass(frozen=True)
class PipelineConfig:
    source_prefix: str
    results_prefix: str
    run_id: str
    max_concurrency: int = 8
    max_pdf_bytes: int = 20_000_000
    max_pages: int = 50


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
    ) -> None:
        self.s3 = s3
        self.committer = committer
        self.extractor = extractor
        self.config = config
        self._llm_slots = asyncio.Semaphore(config.max_concurrency)

    async def select(self, selection: Selection = "new") -> list[WorkItem]:
        """List PDFs under the prefix and claim the ones this run should process."""
        prefix = self.config.source_prefix
        listed = await asyncio.to_thread(lambda: list(self.s3.list_pdfs(prefix)))
        snapshot = await self.committer.store.read()
        candidates = [o for o in listed if needs_claim(snapshot, o.key, o.etag, selection)]
        outcomes = await self.committer.submit_many(
            Claim(o.key, o.etag, self.config.run_id, selection) for o in candidates
        )
        return [
            WorkItem(o.key, o.etag, o.size, out.attempt, invoice_id(o.key, prefix))
            for o, out in zip(candidates, outcomes, strict=True)
            if out.applied
        ]

    def parse(self, item: WorkItem) -> ParsedDoc:
        """Download and parse one PDF. Blocking: run it on a worker thread."""
        try:
            body, etag = self.s3.get(item.key, max_bytes=self.config.max_pdf_bytes)
            parsed = parse_pdf(
                body, max_bytes=self.config.max_pdf_bytes, max_pages=self.config.max_pages
            )
        except PdfError as exc:
            return ParsedDoc(item, error_kind=exc.kind, error_message=str(exc))
        except KeyError:
            return ParsedDoc(
                item,
                error_kind="source_missing",
                error_message=f"{item.key} disappeared before it was read",
                transient=True,
            )
        except ValueError as exc:  # over max_bytes, reported by the S3 layer
            return ParsedDoc(item, error_kind="too_large", error_message=str(exc))
        if etag != item.etag:
            return ParsedDoc(
                item,
                error_kind="source_changed",
                error_message=f"{item.key} changed while being processed",
                transient=True,
            )
        return ParsedDoc(item, text=parsed.text, pages=parsed.pages)

    def parse_many(self, items: list[WorkItem]) -> list[ParsedDoc]:
        return [self.parse(item) for item in items]

    async def extract(self, doc: ParsedDoc) -> InvoiceOutcome:
        """Extract one parsed invoice, write its result, and record the outcome."""
        item = doc.item
        if doc.error_kind:
            return await self._fail(
                doc.item, doc.error_kind, doc.error_message or "", doc.transient
            )
        usage: dict[str, int] = {}
        async with self._llm_slots:
            # Fire-and-forget: monotonic transitions make a late `processing` harmless,
            # and not waiting for its commit keeps the LLM slot busy.
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
                invoice, usage = await self._call_extractor(doc)
            except ExtractionError as exc:
                return await self._fail(item, exc.kind, str(exc), exc.transient)
            except Exception as exc:  # a bug or an unexpected library error: retryable
                log.exception("extractor crashed on %s", item.key)
                return await self._fail(
                    item, "internal_error", f"{type(exc).__name__}: {exc}", True
                )
        key = result_key(self.config.results_prefix, item.invoice_id)
        result = ExtractionResult(
            source_key=item.key,
            source_etag=item.etag,
            extractor=self.extractor.name,
            pages=doc.pages,
            invoice=invoice,
            extracted_at=dt.datetime.now(dt.UTC),
        )
        await asyncio.to_thread(self.s3.put, key, result.model_dump_json(indent=2).encode())
        outcome = await self.committer.submit(
            Transition(
                item.key,
                item.attempt,
                Status.done,
                {
                    "result_key": key,
                    "extractor": self.extractor.name,
                    "vendor_name": invoice.vendor_name,
                    "total": str(invoice.total) if invoice.total is not None else None,
                    "currency": invoice.currency,
                    "error_kind": None,
                    "error_message": None,
                    "transient": None,
                },
            )
        )
        return InvoiceOutcome(item.key, Status.done, outcome.applied, invoice, key, usage=usage)

    async def _call_extractor(self, doc: ParsedDoc) -> tuple[Invoice, dict[str, int]]:
        with_usage = getattr(self.extractor, "extract_with_usage", None)
        if with_usage is None:
            return await self.extractor.extract(doc.text), {}
        invoice, usage = await with_usage(doc.text, invoice_key=doc.item.key)
        return invoice, _usage_dict(usage)

    async def _fail(
        self, item: WorkItem, kind: str, message: str, transient: bool
    ) -> InvoiceOutcome:
        log.warning("invoice %s failed (%s): %s", item.key, kind, message)
        outcome = await self.committer.submit(
            Transition(
                item.key,
                item.attempt,
                Status.failed,
                {"error_kind": kind, "error_message": message[:500], "transient": transient},
            )
        )
        return InvoiceOutcome(
            item.key,
            Status.failed,
            outcome.applied,
            error_kind=kind,
            error_message=message,
            transient=transient,
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
