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

# A table artifact of 10,000 rows is ~3 MB kept to the end of the run and a page no one
# reads; the manifest lists every invoice, the table the ones a person should see.
MAX_TABLE_ROWS = 1000


class TableRows:
    """The rows of the run's table artifact, each kept as its JSON text; at most `limit`.

    A row as a dict of eleven strings took ~1 KB; its JSON text takes ~0.3 KB, and the
    artifact's data is the rows' JSON anyway, so the end of a run joins them once
    instead of building a list of dicts, a sanitized copy of it and its JSON.

    Rows of invoices that need a look (failed, skipped, to review) come first, and
    over the limit one takes the place of the latest routine row; past `limit` of
    those, rows are only counted (`total`).
    """

    def __init__(self, limit: int = MAX_TABLE_ROWS) -> None:
        self.limit = limit
        self.total = 0
        self._needing_a_look: list[str] = []
        self._routine: list[str] = []

    def append(self, row: dict[str, str], *, needs_a_look: bool = False) -> None:
        self.total += 1
        if len(self) >= self.limit:
            if not (needs_a_look and self._routine):
                return
            self._routine.pop()
        # Text, not orjson's bytes: those keep the capacity they were written into.
        rows = self._needing_a_look if needs_a_look else self._routine
        rows.append(orjson.dumps(row).decode())

    def __len__(self) -> int:
        return len(self._needing_a_look) + len(self._routine)

    def _encoded(self) -> Iterator[str]:
        yield from self._needing_a_look
        yield from self._routine

    def __iter__(self) -> Iterator[dict[str, str]]:
        return (orjson.loads(encoded) for encoded in self._encoded())

    def json(self) -> str:
        """The rows as one JSON array: a table artifact's data."""
        return "[" + ",".join(self._encoded()) + "]"


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
        self.rows.append(row(o), needs_a_look=needs_a_look(o))
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


def needs_a_look(o: InvoiceOutcome) -> bool:
    """Failed, let go unfinished, or done but flagged for review."""
    if o.status is Status.submitted:
        return False
    return o.status is not Status.done or o.needs_review


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
