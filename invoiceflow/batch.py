"""Batch mode: invoices answered by a provider batch (half price, within 24 h).

A batch run claims and parses as an online run and takes the e-invoice fast path as
now; `BatchQueue.defer` (the pipeline's hook, called once an invoice is `processing`)
queues the request of every other invoice, and `BatchQueue.submit` sends them as
provider batches, split by requests per batch and bytes per file.

Sending one batch takes four steps, in an order that never lets a crash send an
invoice twice:

1. the *batch record* beside the manifest (``<manifest>.batches/<submission id>.json``:
   which invoice, attempt and source each line is, and the text validation checks the
   answer against), under a new submission id;
2. the invoices move to `submitted` with that submission id. From here on no run
   claims them, whatever happens to this one;
3. the provider batch is created, carrying the submission id (OpenAI: the batch's
   metadata; Bedrock: the job name, its client request token and the input key);
4. the provider's batch id goes into the record and onto the entries.

A run that dies between 2 and 4 leaves a record without a batch id; so does a create
whose outcome is unknown (a timeout). Once the submitting run has ended (Prefect says
so, or the claim timeout has passed, as for claims), `collect` looks the submission up
at the provider: found, the batch is adopted (step 4) and collected like any other; not
found, its invoices are released as transient failures for the next run. A create the
provider refused releases them at once; a create that failed but reached the provider
all the same is adopted at once.

`collect` (the collect-batches flow, and the end of every online run) polls the
batches of the open records. A finished batch's lines go through the pipeline's
`finish`: the same validate -> write -> record path as an online answer. Failed lines
and the lines of an expired, failed or cancelled batch become transient failures, so
the next run claims those invoices again. Results come from the batch output only, so
a collect that crashed halfway is simply run again: it never asks the provider again,
and what it recorded before is refused as "already done". A record is deleted once
none of its invoices waits on it.

Imports nothing from Prefect.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from invoiceflow.documents import ReadDocument
from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.extractors.openai_batch import BatchLimits, BatchState, LineResult, split
from invoiceflow.manifest import Outcome, Status, Transition, entry_or_none
from invoiceflow.pipeline import InvoiceOutcome, InvoicePipeline, ParsedDoc, WorkItem
from invoiceflow.schema import Truncation
from invoiceflow.storage import S3Store

log = logging.getLogger(__name__)

# The error kind of `BatchQueue.defer`'s placeholder outcome: queued, not yet submitted.
QUEUED_FOR_BATCH = "queued_for_batch"
# A create that failed this way may still have reached the provider: not released by the
# submitting run, but settled by `collect` once that run has ended.
UNSETTLED_FAILURES = frozenset({"timeout", "connection", "server_error", "batch_submit_failed"})


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
    # Ours, chosen before the provider is asked; the provider batch carries it too.
    submission_id: str
    # The provider's, once it accepted the batch and a run learnt so.
    batch_id: str | None = None
    provider: str
    model: str
    run_id: str
    # When the submission started: the claim timeout counts from here when Prefect
    # cannot tell whether the submitting run still lives.
    submitted_at: dt.datetime
    invoices: list[BatchInvoice]


class BatchProvider(Protocol):
    """A provider's batch API (`invoiceflow.extractors.openai_batch.OpenAIBatches`)."""

    provider: str
    limits: BatchLimits

    def record_id(self, key: str) -> str: ...

    def line(self, record_id: str, body: Mapping[str, Any]) -> bytes: ...

    async def submit(
        self, jsonl: bytes, submission_id: str, metadata: Mapping[str, str]
    ) -> str: ...

    async def find(self, submission_id: str) -> str | None:
        """The id of the batch this submission created, None if the provider has none."""
        ...

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

    def key(self, submission_id: str) -> str:
        return f"{self.prefix}{submission_id}.json"

    def keys(self) -> list[str]:
        paginator = self.s3.client.get_paginator("list_objects_v2")
        return [
            obj["Key"]
            for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=self.prefix)
            for obj in page.get("Contents", [])
            if obj["Key"].endswith(".json")
        ]

    def put(self, record: BatchRecord) -> None:
        self.s3.put(self.key(record.submission_id), record.model_dump_json().encode())

    def get(self, key: str) -> BatchRecord | None:
        try:
            return BatchRecord.model_validate_json(self.s3.get(key).body)
        except KeyError:
            return None  # collected meanwhile by a concurrent collect
        except ValidationError as exc:  # not one of ours: it must not stop the others
            log.error("batch record %s is unreadable, left as it is: %s", key, exc)
            return None

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
        limits = self.provider.limits
        settled: dict[str, InvoiceOutcome] = {}
        for lines in split(((q.invoice.custom_id, q.line) for q in queued), limits):
            batch = [by_id[custom_id] for custom_id, _ in lines]
            if len(batch) < limits.min_requests:
                settled |= await self._send_online(batch)
            else:
                settled |= await self._submit_one(batch)
        return list(settled.values())

    async def _send_online(self, batch: list[_Queued]) -> dict[str, InvoiceOutcome]:
        """Requests too few for a provider batch, sent as online calls in this run.

        Holding them for a later batch run instead would release them (an attempt used
        each time, `gave_up` after `max_attempts`) and keep a trickle of invoices waiting
        for as long as no run gathers the minimum; a nightly run is expected to finish
        its invoices. Online costs the full price for fewer than the minimum per run.
        """
        log.info(
            "%s batches take at least %d requests; these %d are sent online (full price) "
            "in this run", self.provider.provider, self.provider.limits.min_requests, len(batch),
        )  # fmt: skip
        extractor = self.pipeline.extractor

        async def online(doc: ParsedDoc) -> InvoiceOutcome:
            document = doc.document
            assert document is not None  # only read documents were queued
            images = {"images": document.images} if document.images else {}
            try:
                answer: Extraction | Exception = await extractor.extract_document(
                    document.text, pages=document.pages, invoice_key=doc.item.key, **images
                )
            except Exception as exc:  # the pipeline's boundary classifies it
                answer = exc
            return await self.pipeline.finish(doc, answer)

        self.pipeline.committer.add_producers(len(batch))
        outcomes = await asyncio.gather(*(online(q.doc) for q in batch))
        return {o.key: o for o in outcomes}

    async def _submit_one(self, batch: list[_Queued]) -> dict[str, InvoiceOutcome]:
        """Steps 1-4 of the module docstring for one provider batch."""
        record = BatchRecord(
            submission_id=uuid.uuid4().hex,
            provider=self.provider.provider,
            model=self.extractor.model,
            run_id=self.pipeline.config.run_id,
            submitted_at=dt.datetime.now(dt.UTC),
            invoices=[q.invoice for q in batch],
        )
        await asyncio.to_thread(self.records.put, record)
        intents = await self.pipeline.committer.submit_many(
            Transition(q.invoice.key, q.invoice.attempt, Status.submitted,
                       {"submission_id": record.submission_id})
            for q in batch
        )  # fmt: skip
        sending = [q for q, out in zip(batch, intents, strict=True) if out.applied]
        settled = {
            q.invoice.key: InvoiceOutcome(
                q.invoice.key,
                Status.pending,
                False,
                error_kind="claim_lost",
                error_message=out.reason,
            )
            for q, out in zip(batch, intents, strict=True)
            if not out.applied
        }
        if not sending:
            await asyncio.to_thread(self.records.delete, self.records.key(record.submission_id))
            return settled
        try:
            jsonl = b"".join(q.line for q in sending)
            metadata = {"run_id": record.run_id[:512]}
            batch_id = await self.provider.submit(jsonl, record.submission_id, metadata)
        except Exception as exc:
            return settled | await self._after_failed_create(record, sending, exc)
        return settled | await self._accepted(record, batch_id, [q.invoice for q in sending])

    async def _accepted(
        self, record: BatchRecord, batch_id: str, invoices: list[BatchInvoice]
    ) -> dict[str, InvoiceOutcome]:
        self.batch_ids.append(batch_id)
        outcomes = await record_accepted(self.pipeline, self.records, record, batch_id, invoices)
        return {o.key: o for o in outcomes}

    async def _after_failed_create(
        self, record: BatchRecord, sending: list[_Queued], exc: Exception
    ) -> dict[str, InvoiceOutcome]:
        """The create failed, but may have reached the provider all the same: adopt the
        batch if it exists, release the invoices if the provider surely has none, and
        otherwise leave the submission to `collect`."""
        failure = (
            exc
            if isinstance(exc, ExtractionError)
            else ExtractionError("batch_submit_failed", str(exc), transient=True)
        )
        try:
            found = await self.provider.find(record.submission_id)
        except Exception as lookup:
            log.warning("looking up submission %s failed: %s", record.submission_id, lookup)
            found, unsure = None, True
        else:
            unsure = failure.kind in UNSETTLED_FAILURES
        if found is not None:
            return await self._accepted(record, found, [q.invoice for q in sending])
        if unsure:
            log.warning(
                "submitting %d requests (submission %s) failed, and the provider may have "
                "accepted them all the same: collect-batches settles it once this run has "
                "ended (%s)", len(sending), record.submission_id, failure,
            )  # fmt: skip
            return {
                q.invoice.key: InvoiceOutcome(q.invoice.key, Status.submitted, True)
                for q in sending
            }
        log.error("the provider refused a batch of %d requests: %s", len(sending), failure)
        # Not the invoices' fault, whatever the provider said: the next run tries again.
        refused = ExtractionError("batch_refused", f"batch refused: {failure}", transient=True)
        outcomes = await release(self.pipeline, [q.doc for q in sending], refused)
        await asyncio.to_thread(self.records.delete, self.records.key(record.submission_id))
        return {o.key: o for o in outcomes}


@dataclass(frozen=True)
class BatchAccepted:
    """Put the provider's batch id on an entry submitted under ``submission_id``."""

    key: str
    attempt: int
    submission_id: str
    batch_id: str

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        raw = entries.get(self.key)
        entry = entry_or_none(raw)
        if entry is None or not _submitted_in(raw or {}, self.attempt, self.submission_id):
            return Outcome(False, entry.attempts if entry else 0, "not in this submission")
        if entry.batch_id == self.batch_id:
            return Outcome(True, entry.attempts, changed=False)  # recorded already
        accepted = entry.model_copy(update={"batch_id": self.batch_id, "updated_at": now})
        entries[self.key] = accepted.model_dump(mode="json", exclude_none=True)
        return Outcome(True, entry.attempts)


def _submitted_in(raw: Mapping[str, Any], attempt: int, submission_id: str) -> bool:
    return (
        raw.get("attempts") == attempt
        and raw.get("status") == Status.submitted
        and raw.get("submission_id") == submission_id
    )


async def record_accepted(
    pipeline: InvoicePipeline,
    records: BatchRecords,
    record: BatchRecord,
    batch_id: str,
    invoices: Sequence[BatchInvoice],
) -> list[InvoiceOutcome]:
    """Step 4: the provider's batch id into the record, then onto the entries."""
    await asyncio.to_thread(records.put, record.model_copy(update={"batch_id": batch_id}))
    committed = await pipeline.committer.submit_many(
        BatchAccepted(i.key, i.attempt, record.submission_id, batch_id) for i in invoices
    )
    return [
        InvoiceOutcome(i.key, Status.submitted, out.applied)
        for i, out in zip(invoices, committed, strict=True)
    ]


async def release(
    pipeline: InvoicePipeline, docs: Sequence[ParsedDoc], failure: ExtractionError
) -> list[InvoiceOutcome]:
    """Record ``failure`` (transient) for invoices no provider batch holds: the next run
    claims them again."""
    pipeline.committer.add_producers(len(docs))
    return list(await asyncio.gather(*(pipeline.finish(doc, failure) for doc in docs)))


@dataclass
class CollectReport:
    """What one collect pass found and recorded."""

    open_batches: list[str] = field(default_factory=list)
    collected_batches: list[str] = field(default_factory=list)
    outcomes: list[InvoiceOutcome] = field(default_factory=list)


def _waits_on(raw: Mapping[str, Any] | None, invoice: BatchInvoice, record: BatchRecord) -> bool:
    """Whether the manifest entry still waits for this line: same attempt, `submitted`
    in this record's submission."""
    return raw is not None and _submitted_in(raw, invoice.attempt, record.submission_id)


async def _waiting(pipeline: InvoicePipeline, record: BatchRecord) -> list[BatchInvoice]:
    snapshot = await pipeline.committer.store.read()
    return [i for i in record.invoices if _waits_on(snapshot.entries.get(i.key), i, record)]


async def collect(
    pipeline: InvoicePipeline,
    extractor: BatchExtractor,
    provider: BatchProvider,
    records: BatchRecords,
) -> CollectReport:
    """Record the answers of every finished batch with an open record, and settle the
    submissions no run recorded a batch for (see the module)."""
    report = CollectReport()
    for key in await asyncio.to_thread(records.keys):
        record = await asyncio.to_thread(records.get, key)
        if record is None or record.provider != provider.provider:
            continue
        if record.batch_id is None:
            record = await _settle_submission(pipeline, provider, records, record, report)
            if record is None or record.batch_id is None:
                continue
        state = await provider.state(record.batch_id)
        if not state.finished:
            report.open_batches.append(record.batch_id)
            continue
        report.outcomes += await _record_batch(pipeline, extractor, provider, record, state)
        if not await _waiting(pipeline, record):
            await asyncio.to_thread(records.delete, key)
            report.collected_batches.append(record.batch_id)
    return report


async def _settle_submission(
    pipeline: InvoicePipeline,
    provider: BatchProvider,
    records: BatchRecords,
    record: BatchRecord,
    report: CollectReport,
) -> BatchRecord | None:
    """A record without the provider's batch id. While its run may still record (or
    settle) it, it stays open; once that run has ended, the batch the provider has for
    the submission is adopted, or, if it has none, the invoices are released. The
    record to collect, or None."""
    if not await _submitter_gone(pipeline, record):
        report.open_batches.append(record.submission_id)  # its run records it, or settles it
        return None
    found = await provider.find(record.submission_id)
    if found is not None:
        log.warning(
            "submission %s of run %s: adopting provider batch %s, which that run never "
            "recorded", record.submission_id, record.run_id, found,
        )  # fmt: skip
        await record_accepted(pipeline, records, record, found, await _waiting(pipeline, record))
        return record.model_copy(update={"batch_id": found})
    message = f"run {record.run_id} ended before provider batch {record.submission_id} existed"
    failure = ExtractionError("batch_not_submitted", message, transient=True)
    docs = [i.parsed() for i in await _waiting(pipeline, record)]
    report.outcomes += await release(pipeline, docs, failure)
    await asyncio.to_thread(records.delete, records.key(record.submission_id))
    return None


async def _submitter_gone(pipeline: InvoicePipeline, record: BatchRecord) -> bool:
    """Whether the run that wrote ``record`` can no longer create its batch: the same
    rule as for taking over its claims (Prefect says it ended; when Prefect cannot tell,
    the claim timeout has passed)."""
    if pipeline.runs is not None:
        runs = await pipeline.runs({record.run_id})
        if record.run_id in runs.ended:
            return True
        if record.run_id in runs.live:
            return False
    return dt.datetime.now(dt.UTC) - record.submitted_at >= pipeline.config.claim_timeout


async def _record_batch(
    pipeline: InvoicePipeline,
    extractor: BatchExtractor,
    provider: BatchProvider,
    record: BatchRecord,
    state: BatchState,
) -> list[InvoiceOutcome]:
    waiting = await _waiting(pipeline, record)
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
