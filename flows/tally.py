"""The run summary, accumulated as outcomes arrive instead of from a list kept to the end.

A run of 10,000 invoices used to keep every `InvoiceOutcome` (each with its full
`Invoice`, line items included) alive until the summary; the tally keeps only what the
summary and its artifacts show: counts, token and cost sums, totals per currency, the
failures, and one short table row per invoice, kept as its JSON (`TableRows`). The log
line of an invoice is written when it finishes (at DEBUG when it is done: progress is
logged every 10%).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from decimal import Decimal

import orjson

from invoiceflow.batch import QUEUED_FOR_BATCH
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoiceOutcome


class TableRows:
    """The rows of the run's table artifact, each kept as its JSON text.

    A row as a dict of eleven strings took ~1 KB; its JSON text takes ~0.3 KB, and the
    artifact's data is the rows' JSON anyway, so the end of a 10,000-invoice run joins
    them once instead of building a list of dicts, a sanitized copy of it and its JSON.
    """

    def __init__(self) -> None:
        self._encoded: list[str] = []

    def append(self, row: dict[str, str]) -> None:
        # Text, not orjson's bytes: those keep the capacity they were written into.
        self._encoded.append(orjson.dumps(row).decode())

    def __len__(self) -> int:
        return len(self._encoded)

    def __iter__(self) -> Iterator[dict[str, str]]:
        return (orjson.loads(encoded) for encoded in self._encoded)

    def json(self) -> str:
        """The rows as one JSON array: a table artifact's data."""
        return "[" + ",".join(self._encoded) + "]"


class RunTally:
    """Counts, sums and rows of a run's outcomes; `add` each outcome once."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self._logger = logger
        self.statuses: Counter[Status] = Counter()
        self.observed = 0
        self.finished = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cost: Decimal | None = None
        self.needs_review = 0
        self.duplicates = 0
        self.by_source: Counter[str] = Counter()
        self.totals: dict[str, Decimal] = {}
        self.failures: dict[str, str] = {}
        self.rows = TableRows()

    @classmethod
    def of(
        cls, outcomes: Iterable[InvoiceOutcome], logger: logging.Logger | None = None
    ) -> RunTally:
        tally = cls(logger)
        for outcome in outcomes:
            tally.add(outcome)
        return tally

    def add(self, o: InvoiceOutcome) -> None:
        if o.error_kind == QUEUED_FOR_BATCH:
            return  # batch mode's placeholder: the real outcome comes from the submit
        self.observed += 1
        self.statuses[o.status] += 1
        if self._logger is not None:
            self._logger.log(*log_line(o))
        self.rows.append(row(o))
        if o.status is Status.failed:
            self.failures[o.key] = f"{o.error_kind}: {o.error_message}"
        if not o.finished:
            return
        self.finished += 1  # failed invoices count too: their tokens were billed
        self.prompt_tokens += o.usage.get("prompt_tokens", 0)
        self.completion_tokens += o.usage.get("completion_tokens", 0)
        self.cached_tokens += o.usage.get("cached_tokens", 0)
        if o.cost is not None:
            self.cost = (self.cost or Decimal(0)) + o.cost
        self.needs_review += o.needs_review
        self.duplicates += o.duplicate_of is not None
        if o.source is not None:
            self.by_source[o.source] += 1
        if o.status is Status.done and o.invoice is not None and o.invoice.total is not None:
            currency = o.invoice.currency or "?"
            self.totals[currency] = self.totals.get(currency, Decimal(0)) + o.invoice.total


def log_line(o: InvoiceOutcome) -> tuple[int, str]:
    """One line per invoice outcome. Only fields and our own error text: no secrets."""
    if o.status is Status.done and o.invoice is not None:
        inv = o.invoice
        review = " [needs review]" if o.needs_review else ""
        tokens = _tokens(o)
        used = f" ({tokens} tokens)" if tokens else ""
        return (
            logging.DEBUG,  # the table artifact has every invoice; the log, its failures
            f"done {o.key}: {inv.vendor_name} {inv.total} {inv.currency}{used}{review}",
        )
    if o.status is Status.submitted:
        return logging.DEBUG, f"submitted {o.key} in a provider batch"
    if not o.finished:
        return logging.WARNING, f"skipped {o.key}: {o.error_kind}: {o.error_message}"
    kind = "transient" if o.transient else "permanent"
    return logging.WARNING, f"failed {o.key} ({kind}): {o.error_kind}: {o.error_message}"


def _tokens(o: InvoiceOutcome) -> int:
    return o.usage.get("prompt_tokens", 0) + o.usage.get("completion_tokens", 0)


def row(o: InvoiceOutcome) -> dict[str, str]:
    """The invoice's row in the run's table artifact."""
    inv = o.invoice
    tokens = _tokens(o)
    return {
        "invoice": o.key,
        "status": o.status.value,
        "type": (inv.document_type or "") if inv else "",
        "read_as": o.read_as or "",
        "vendor": (inv.vendor_name or "") if inv else "",
        "total": str(inv.total) if inv and inv.total is not None else "",
        "currency": (inv.currency or "") if inv else "",
        "needs_review": ("yes" if o.needs_review else "no") if o.finished else "",
        "tokens": str(tokens) if tokens else "",
        "cost": f"{o.cost} {o.cost_currency or ''}".strip() if o.cost is not None else "",
        "error": f"{o.error_kind}: {o.error_message}" if o.error_kind else "",
    }
