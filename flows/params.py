"""Flow parameters. Titles and descriptions become the Prefect UI's run form."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, field_validator, model_validator

from flows.lock import LOCK_WAIT_SECONDS
from invoiceflow import defaults
from invoiceflow.documents import DocumentLimits
from invoiceflow.manifest import (
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_MANIFEST_BYTES,
    key_collisions,
)
from invoiceflow.pipeline import chunked
from invoiceflow.storage import LISTING_PAGE_SIZE, RESULT_SUFFIX, SOURCE_SUFFIXES

T = TypeVar("T")

# The flow's thread pool: parse threads only download and wait on the document worker
# processes (which do the CPU work, off the flow's GIL), so a few keep the pool busy.
PARSE_THREADS = 4

# Invoices read that may wait, beyond the LLM calls in flight, for a slot or a commit:
# three per slot (an invoice waits on its `processing` and `done` commits about as long
# as on its LLM call), but no more than this many. At C=256 on 2 cores a run is
# CPU-bound at ~40-45 invoices/s, each ~3-4 s in flight, so ~200 suffice; 3 x 256
# waiting held ~10 KB each and bought no throughput (benchmarks/README.md, issue 13 #4).
MAX_WAITING_INVOICES = 256

DOCUMENT_DEFAULTS = DocumentLimits()


class ProcessInvoicesParams(BaseModel):
    source_prefix: str = Field(
        default=defaults.SOURCE_PREFIX,
        title="Source prefix",
        description="S3 prefix (folder) holding the invoice PDFs, e.g. `incoming/2026-11/`.",
    )
    source_suffixes: tuple[str, ...] = Field(
        default=SOURCE_SUFFIXES,
        title="Source file types",
        description="Which keys under the prefix are invoices, by ending (any case): PDFs "
        "(text, scanned, or with embedded Factur-X/ZUGFeRD/XRechnung XML) and bare "
        "e-invoice XML (XRechnung, Peppol UBL, CII, ZUGFeRD 1).",
    )
    selection: Literal["new", "failed", "all"] = Field(
        default="new",
        title="Which invoices",
        description="`new`: not yet done (new, changed, or failed transiently). "
        "`failed`: every failed invoice, permanent failures included. "
        "`all`: everything under the prefix again (re-bills the LLM).",
    )
    llm_mode: Literal["online", "batch"] = Field(
        default="online",
        title="LLM mode",
        description="`online`: call the LLM now. `batch`: send the LLM requests as a "
        "provider batch (about half price, answered within 24 h; OpenAI-compatible "
        "extractors); the collect-batches deployment records the answers.",
    )
    max_llm_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        title="Max LLM concurrency",
        description="Extraction calls in flight at once in this run.",
    )
    invoices_per_task: int = Field(
        default=0,
        ge=0,
        le=1000,
        title="Invoices per task",
        description="0 chooses automatically: one invoice per task for small runs (each "
        "visible and retried on its own), chunks for large runs so the Prefect server "
        "is not the bottleneck.",
    )
    results_prefix: str = Field(
        default=defaults.RESULTS_PREFIX,
        title="Results prefix",
        description="Where one JSON result per invoice is written.",
    )
    manifest_key: str = Field(
        default=defaults.MANIFEST_KEY,
        title="Manifest key",
        description="The S3 object recording every invoice's status.",
    )
    bucket_block: str = Field(
        default=defaults.BUCKET_BLOCK,
        title="S3 bucket block",
        description="Name of the saved prefect-aws S3Bucket block.",
    )
    extractor_block: str = Field(
        default=defaults.EXTRACTOR_BLOCK,
        title="Extractor block",
        description="Name of the saved Invoice Extractor block (rules or an LLM).",
    )
    failure_notification_block: str = Field(
        default=defaults.FAILURE_NOTIFICATION_BLOCK,
        title="Notify on failure",
        description="Notification block told when the run fails, as `type/name`, e.g. "
        "`custom-webhook/invoiceflow-on-failure` or `slack-webhook/ops`. Nobody is "
        "notified while that block is not saved; empty turns notification off.",
    )
    manifest_lock: str = Field(
        default=defaults.MANIFEST_LOCK,
        title="Manifest lock",
        description="Global concurrency limit (size 1) serializing manifest writes.",
    )
    commit_interval_s: float = Field(
        default=2.0,
        ge=0,
        le=30,
        title="Manifest commit interval (s)",
        description="Longest an update waits to be batched into one manifest write.",
    )

    max_commit_batch: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        title="Manifest commit batch",
        description="Most status updates written in one manifest commit.",
    )
    max_attempts: int = Field(
        default=DEFAULT_MAX_ATTEMPTS,
        ge=1,
        le=100,
        title="Max attempts per invoice",
        description="Attempts, across runs, after which an invoice that keeps failing "
        "transiently (or whose runs keep dying on it) stops being retried: it becomes "
        "`gave_up`, permanent, with its last error kept.",
    )
    claim_timeout_s: float = Field(
        default=DEFAULT_CLAIM_TIMEOUT.total_seconds(),
        ge=1,
        le=86_400,
        title="Claim timeout (s)",
        description="A claim whose run Prefect does not know is taken over after this "
        "long without renewal. Live runs renew their claims well within it; claims of "
        "runs Prefect reports ended are taken over at once, of runs it reports live never.",
    )
    manifest_lock_wait_s: float = Field(
        default=LOCK_WAIT_SECONDS,
        ge=0,
        le=3600,
        title="Manifest lock wait (s)",
        description="How long a manifest write keeps retrying a deleted or disabled "
        "manifest lock before the run stops with the command that restores it.",
    )
    max_manifest_bytes: int = Field(
        default=DEFAULT_MAX_MANIFEST_BYTES,
        ge=1024,
        le=4 * 1024**3,
        title="Max manifest size (bytes)",
        description="A larger manifest object stops the run before any work, with the "
        "command that rebuilds it (`invoiceflow reconcile --rebuild`).",
    )
    max_pdf_bytes: int = Field(
        default=20_000_000,
        ge=1,
        le=1_000_000_000,
        title="Max PDF size (bytes)",
        description="Larger PDFs fail permanently as `too_large` without being downloaded.",
    )
    max_pages: int = Field(
        default=50,
        ge=1,
        le=10_000,
        title="Max pages per PDF",
        description="PDFs with more pages fail permanently as `too_many_pages`.",
    )
    document_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        title="Document worker processes",
        description="Processes reading documents (pypdf, attachments, OCR, the rules "
        "extractor) at once. Each is killed and replaced when it runs past a budget.",
    )
    ocr_languages: str = Field(
        default=DOCUMENT_DEFAULTS.ocr_languages,
        pattern=r"^[a-z_]{3,}(\+[a-z_]{3,})*$",
        title="OCR languages",
        description="Tesseract language packs for scanned pages, joined with '+' (Debian "
        "packages tesseract-ocr-deu, -fra, -nld, -eng; add others the same way).",
    )
    ocr_page_time_s: float = Field(
        default=DOCUMENT_DEFAULTS.ocr_page_time_s,
        ge=1,
        le=600,
        title="OCR time per page (s)",
        description="Tesseract's own timeout per scanned page, inside the time per document.",
    )
    document_time_limit_s: float = Field(
        default=DOCUMENT_DEFAULTS.time_limit_s,
        ge=1,
        le=3600,
        title="Time per document (s)",
        description="Wall clock for reading one document; past it the worker is killed and "
        "the invoice fails permanently as `too_slow`.",
    )
    document_memory_limit_mb: int = Field(
        default=DOCUMENT_DEFAULTS.memory_limit_mb,
        ge=128,
        le=65_536,
        title="Memory per document worker (MB)",
        description="Address-space limit (RLIMIT_AS) of each document worker; a document "
        "that needs more fails permanently as `too_large`.",
    )

    @field_validator("source_prefix", "results_prefix")
    @classmethod
    def _folder(cls, value: str) -> str:
        value = value.lstrip("/")
        if ".." in value.split("/"):
            raise ValueError("prefix must not contain '..'")
        return value if not value or value.endswith("/") else value + "/"

    @field_validator("source_suffixes")
    @classmethod
    def _suffixes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(dict.fromkeys(s.strip().lower() for s in value))
        if not cleaned or any(not s.startswith(".") or len(s) < 2 for s in cleaned):
            raise ValueError("source suffixes look like '.pdf' or '.xml'")
        if RESULT_SUFFIX in cleaned:
            raise ValueError(f"{RESULT_SUFFIX} is what results end in; it cannot be a source")
        return cleaned

    @model_validator(mode="after")
    def _keys_cannot_collide(self) -> ProcessInvoicesParams:
        problems = key_collisions(
            self.source_prefix, self.results_prefix, self.manifest_key, self.source_suffixes
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def claim_timeout(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.claim_timeout_s)

    @property
    def claim_renewal_s(self) -> float:
        """How often the run renews its claims: a fifth of the timeout, at most a minute."""
        return min(60.0, self.claim_timeout_s / 5)

    def document_limits(self, **vision: Any) -> DocumentLimits:
        """The budgets for reading one document, from these parameters; `vision` holds
        the extractor block's image settings (`ExtractorBlock.vision_limits`)."""
        return DocumentLimits(
            max_bytes=self.max_pdf_bytes,
            max_pages=self.max_pages,
            time_limit_s=self.document_time_limit_s,
            memory_limit_mb=self.document_memory_limit_mb,
            ocr_languages=self.ocr_languages,
            ocr_page_time_s=self.ocr_page_time_s,
            **vision,
        )

    def chunks(
        self, items: list[T], *, claimed_before: int = 0, more_to_come: bool = False
    ) -> list[list[T]]:
        """The parse stage's task inputs for `items`, a page of claims that follows
        `claimed_before` others of the run; `more_to_come` when the listing goes on."""
        if self.invoices_per_task:
            return chunked(items, self.invoices_per_task)
        # ≤50 invoices: one per task. Beyond, ~50 chunks per stage (of at most 100) of
        # what the run will have claimed by this page's end (a listing that goes on has
        # a page of 1,000 more at least) keeps task runs (each ~60 ms of server CPU) a
        # small share of the work while still pipelining; the run's first chunks are
        # small so its first LLM calls start within a second or so.
        n = claimed_before + len(items) + (LISTING_PAGE_SIZE if more_to_come else 0)
        size = 1 if n <= 50 else min(100, -(-n // 50))
        return chunked(items, size, ramp=claimed_before == 0)

    def invoices_in_flight(self, chunk_size: int) -> int:
        """Invoices read and not yet finished, at most: the parse threads' chunks, the
        LLM calls in flight, and those waiting (`MAX_WAITING_INVOICES`). Documents are
        read only this far ahead of the LLM calls, so memory follows what is in flight,
        not the run's size."""
        calls = self.max_llm_concurrency
        return PARSE_THREADS * chunk_size + calls + min(3 * calls, MAX_WAITING_INVOICES)
