"""Flow parameters. Titles and descriptions become the Prefect UI's run form."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from flows.lock import LOCK_WAIT_SECONDS
from invoiceflow.manifest import DEFAULT_CLAIM_TIMEOUT, DEFAULT_MAX_ATTEMPTS, key_collisions


class ProcessInvoicesParams(BaseModel):
    source_prefix: str = Field(
        default="incoming/",
        title="Source prefix",
        description="S3 prefix (folder) holding the invoice PDFs, e.g. `incoming/2026-11/`.",
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
        default="results/",
        title="Results prefix",
        description="Where one JSON result per invoice is written.",
    )
    manifest_key: str = Field(
        default="manifest.json",
        title="Manifest key",
        description="The S3 object recording every invoice's status.",
    )
    bucket_block: str = Field(
        default="invoiceflow-bucket",
        title="S3 bucket block",
        description="Name of the saved prefect-aws S3Bucket block.",
    )
    extractor_block: str = Field(
        default="invoiceflow-extractor",
        title="Extractor block",
        description="Name of the saved Invoice Extractor block (rules or an LLM).",
    )
    failure_notification_block: str = Field(
        default="custom-webhook/invoiceflow-on-failure",
        title="Notify on failure",
        description="Notification block told when the run fails, as `type/name`, e.g. "
        "`custom-webhook/invoiceflow-on-failure` or `slack-webhook/ops`. Nobody is "
        "notified while that block is not saved; empty turns notification off.",
    )
    manifest_lock: str = Field(
        default="invoiceflow-manifest",
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

    @field_validator("source_prefix", "results_prefix")
    @classmethod
    def _folder(cls, value: str) -> str:
        value = value.lstrip("/")
        if ".." in value.split("/"):
            raise ValueError("prefix must not contain '..'")
        return value if not value or value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _keys_cannot_collide(self) -> ProcessInvoicesParams:
        problems = key_collisions(self.source_prefix, self.results_prefix, self.manifest_key)
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

    def chunk_size(self, n: int) -> int:
        if self.invoices_per_task:
            return self.invoices_per_task
        # ≤50 invoices: one per task. Beyond, ~50 chunks per stage keeps task runs (each
        # ~60 ms of server CPU) a small share of the work while still pipelining.
        return 1 if n <= 50 else -(-n // 50)
