"""Batch mode: invoices answered by a provider batch (half price, within 24 h).

A batch run claims and parses as an online run and takes the e-invoice fast path as
now; `BatchQueue.defer` (the pipeline's hook, called once an invoice is `processing`)
queues the request of every other invoice, and `BatchQueue.submit` sends them as
provider batches, split by requests per batch and bytes per file. For each batch it
writes a *batch record* beside the manifest (``<manifest>.batches/<batch id>.json``:
which invoice, attempt and source each line is, and the text validation checks the
answer against), then moves the invoices to `submitted` with the batch id. Nobody
claims a submitted invoice.

`collect` (the collect-batches flow, and the end of every online run) polls the
batches of the open records. A finished batch's lines go through the pipeline's
`finish`: the same validate -> write -> record path as an online answer. Failed lines
and the lines of an expired, failed or cancelled batch become transient failures, so
the next run claims those invoices again. Results come from the batch output only, so
a collect that crashed halfway is simply run again: it never asks the provider again,
and what it recorded before is refused as "already done". A record is deleted once
none of its invoices waits on it.

Not covered: a crash between the provider accepting a batch and its record being
written leaves the invoices `processing`; the next run takes them over and requests
them again (that batch is billed as well).

Imports nothing from Prefect.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from invoiceflow.documents import ReadDocument
from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.extractors.openai_batch import BatchLimits, BatchState, LineResult, split
from invoiceflow.manifest import Status, Transition
from invoiceflow.pipeline import InvoiceOutcome, InvoicePipeline, ParsedDoc, WorkItem
from invoiceflow.schema import Truncation
from invoiceflow.storage import S3Store

log = logging.getLogger(__name__)

# The error kind of `BatchQueue.defer`'s placeholder outcome: queued, not yet submitted.
QUEUED_FOR_BATCH = "queued_for_batch"


class BatchInvoice(BaseModel):
    """One line of a provider batch: whose request it is, and what `finish` needs."""

    custom_id: str
    key: str
    etag: str
    size: int
    attempt: int
    invoice_id: str
    pages: int
    # The document text validation checks the answer against (fields not in it drop).
    text: str
    read_as: str = "text"
    review_reasons: list[str] = []
    truncation: Truncation | None = None
    notes: list[str] = []

    def parsed(self) -> ParsedDoc:
        """The invoice as the pipeline's `finish` takes it (page images are not kept)."""
        item = WorkItem(self.key, self.etag, self.size, self.attempt, self.invoice_id)
        document = ReadDocument(
            text=self.text,
            pages=self.pages,
            read_as=self.read_as,  # type: ignore[arg-type]
            review_reasons=tuple(self.review_reasons),
        )
        return ParsedDoc(item, document)


class BatchRecord(BaseModel):
    batch_id: str
    provider: str
    model: str
    run_id: str
    submitted_at: dt.datetime
    invoices: list[BatchInvoice]


class BatchProvider(Protocol):
    """A provider's batch API (`invoiceflow.extractors.openai_batch.OpenAIBatches`)."""

    provider: str
    limits: BatchLimits

    def record_id(self, key: str) -> str: ...

    def line(self, record_id: str, body: Mapping[str, Any]) -> bytes: ...

    async def submit(self, jsonl: bytes, metadata: Mapping[str, str]) -> str: ...

    async def state(self, batch_id: str) -> BatchState: ...

    async def results(self, state: BatchState) -> dict[str, LineResult]: ...


class BatchExtractor(Protocol):
    """What batch mode needs of the extractor (`OpenAIExtractor`)."""

    model: str

    def batch_body(
        self, text: str, *, images: Any = ()
    ) -> tuple[dict[str, Any], Truncation | None, list[str]]: ...

    def batch_extraction(
        self, response_body: Mapping[str, Any], *, truncation: Truncation | None, notes: Any
    ) -> Extraction: ...


class BatchRecords:
    """The open batch records beside the manifest, one S3 object per batch."""

    def __init__(self, s3: S3Store, manifest_key: str) -> None:
        self.s3 = s3
        self.prefix = f"{manifest_key}.batches/"

    def key(self, batch_id: str) -> str:
        return f"{self.prefix}{batch_id}.json"

    def keys(self) -> list[str]:
        paginator = self.s3.client.get_paginator("list_objects_v2")
        return [
            obj["Key"]
            for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=self.prefix)
            for obj in page.get("Contents", [])
            if obj["Key"].endswith(".json")
        ]

    def put(self, record: BatchRecord) -> None:
        self.s3.put(self.key(record.batch_id), record.model_dump_json().encode())

    def get(self, key: str) -> BatchRecord | None:
        try:
            return BatchRecord.model_validate_json(self.s3.get(key).body)
        except KeyError:
            return None  # collected meanwhile by a concurrent collect

    def delete(self, key: str) -> None:
        self.s3.client.delete_object(Bucket=self.s3.bucket, Key=key)


@dataclass
class _Queued:
    doc: ParsedDoc
    line: bytes
    invoice: BatchInvoice


class BatchQueue:
    """Collects a batch run's LLM requests and submits them as provider batches."""

    def __init__(
        self,
        pipeline: InvoicePipeline,
        extractor: BatchExtractor,
        provider: BatchProvider,
        records: BatchRecords,
    ) -> None:
        self.pipeline = pipeline
        self.extractor = extractor
        self.provider = provider
        self.records = records
        self._queued: list[_Queued] = []
        self.batch_ids: list[str] = []

    def defer(self, doc: ParsedDoc) -> InvoiceOutcome:
        """The pipeline's hook: queue ``doc``'s request (its `processing` is committed).
        An error here (an unsendable document) is the invoice's failure, as online."""
        item, document = doc.item, doc.document
        assert document is not None  # only read documents reach the extractor step
        body, truncation, notes = self.extractor.batch_body(document.text, images=document.images)
        invoice = BatchInvoice(
            custom_id=self.provider.record_id(item.key),
            key=item.key,
            etag=item.etag,
            size=item.size,
            attempt=item.attempt,
            invoice_id=item.invoice_id,
            pages=document.pages,
            text=document.text,
            read_as=document.read_as,
            review_reasons=list(document.review_reasons),
            truncation=truncation,
            notes=notes,
        )
        self._queued.append(_Queued(doc, self.provider.line(invoice.custom_id, body), invoice))
        return InvoiceOutcome(item.key, Status.submitted, False, error_kind=QUEUED_FOR_BATCH)

    async def submit(self) -> list[InvoiceOutcome]:
        """Send everything queued; what happened to each queued invoice (`submitted`, or
        `failed`), which replaces its placeholder from `defer`."""
        queued, self._queued = self._queued, []
        by_id = {q.invoice.custom_id: q for q in queued}
        settled: dict[str, InvoiceOutcome] = {}
        for lines in split(((q.invoice.custom_id, q.line) for q in queued), self.provider.limits):
            settled |= await self._submit_one([by_id[custom_id] for custom_id, _ in lines])
        return list(settled.values())

    async def _submit_one(self, batch: list[_Queued]) -> dict[str, InvoiceOutcome]:
        jsonl = b"".join(q.line for q in batch)
        run_id = self.pipeline.config.run_id
        try:
            batch_id = await self.provider.submit(jsonl, {"run_id": run_id[:512]})
        except Exception as exc:
            failure = (
                exc
                if isinstance(exc, ExtractionError)
                else ExtractionError("batch_submit_failed", str(exc), transient=True)
            )
            return await self._fail_all(batch, failure)
        record = BatchRecord(
            batch_id=batch_id,
            provider=self.provider.provider,
            model=self.extractor.model,
            run_id=run_id,
            submitted_at=dt.datetime.now(dt.UTC),
            invoices=[q.invoice for q in batch],
        )
        await asyncio.to_thread(self.records.put, record)
        self.batch_ids.append(batch_id)
        committed = await self.pipeline.committer.submit_many(
            Transition(q.invoice.key, q.invoice.attempt, Status.submitted, {"batch_id": batch_id})
            for q in batch
        )
        return {
            q.invoice.key: InvoiceOutcome(q.invoice.key, Status.submitted, out.applied)
            for q, out in zip(batch, committed, strict=True)
        }

    async def _fail_all(
        self, batch: list[_Queued], failure: ExtractionError
    ) -> dict[str, InvoiceOutcome]:
        log.error("submitting a batch of %d requests failed: %s", len(batch), failure)
        self.pipeline.committer.add_producers(len(batch))
        outcomes = await asyncio.gather(*(self.pipeline.finish(q.doc, failure) for q in batch))
        return {o.key: o for o in outcomes}


@dataclass
class CollectReport:
    """What one collect pass found and recorded."""

    open_batches: list[str] = field(default_factory=list)
    collected_batches: list[str] = field(default_factory=list)
    outcomes: list[InvoiceOutcome] = field(default_factory=list)


def _waits_on(raw: Mapping[str, Any] | None, invoice: BatchInvoice, batch_id: str) -> bool:
    """Whether the manifest entry still waits for this batch line: same attempt, and
    `submitted` to it (or still `processing`, when the `submitted` commit was lost)."""
    if raw is None or raw.get("attempts") != invoice.attempt:
        return False
    status = raw.get("status")
    return (status == Status.submitted and raw.get("batch_id") == batch_id) or (
        status == Status.processing
    )


async def collect(
    pipeline: InvoicePipeline,
    extractor: BatchExtractor,
    provider: BatchProvider,
    records: BatchRecords,
) -> CollectReport:
    """Record the answers of every finished batch with an open record (see the module)."""
    report = CollectReport()
    for key in await asyncio.to_thread(records.keys):
        record = await asyncio.to_thread(records.get, key)
        if record is None or record.provider != provider.provider:
            continue
        state = await provider.state(record.batch_id)
        if not state.finished:
            report.open_batches.append(record.batch_id)
            continue
        report.outcomes += await _record_batch(pipeline, extractor, provider, record, state)
        snapshot = await pipeline.committer.store.read()
        if not any(
            _waits_on(snapshot.entries.get(i.key), i, record.batch_id) for i in record.invoices
        ):
            await asyncio.to_thread(records.delete, key)
            report.collected_batches.append(record.batch_id)
    return report


async def _record_batch(
    pipeline: InvoicePipeline,
    extractor: BatchExtractor,
    provider: BatchProvider,
    record: BatchRecord,
    state: BatchState,
) -> list[InvoiceOutcome]:
    snapshot = await pipeline.committer.store.read()
    waiting = [
        i for i in record.invoices if _waits_on(snapshot.entries.get(i.key), i, record.batch_id)
    ]
    if not waiting:
        return []
    lines = await provider.results(state)
    missing = _missing_line(state)
    pipeline.committer.add_producers(len(waiting))

    async def finish(invoice: BatchInvoice) -> InvoiceOutcome:
        doc = invoice.parsed()
        line = lines.get(invoice.custom_id, missing)
        if isinstance(line, ExtractionError):
            return await pipeline.finish(doc, line)
        try:
            answer: Extraction | Exception = extractor.batch_extraction(
                line, truncation=invoice.truncation, notes=invoice.notes
            )
        except Exception as exc:  # the pipeline's boundary classifies it
            answer = exc
        return await pipeline.finish(doc, answer)

    return list(await asyncio.gather(*(finish(i) for i in waiting)))


def _missing_line(state: BatchState) -> ExtractionError:
    """Why a line has no answer, from the batch's final state (transient: released)."""
    if state.status in ("expired", "cancelled"):
        message = f"provider batch {state.batch_id} {state.status} before answering"
        return ExtractionError("batch_expired", message, transient=True)
    if state.status == "failed":
        message = f"provider batch {state.batch_id} failed: {state.errors or 'no reason given'}"
        return ExtractionError("batch_failed", message, transient=True)
    message = f"provider batch {state.batch_id} has no answer for this invoice"
    return ExtractionError("batch_line_missing", message, transient=True)
