"""What a run reports: its summary, its artifacts, and a loud failure when invoices failed."""

from __future__ import annotations

import logging
from collections import Counter
from decimal import Decimal

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.logging import get_run_logger
from pydantic import BaseModel

from flows.params import ProcessInvoicesParams
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoiceOutcome, run_totals


class InvoicesFailed(RuntimeError):
    """Some invoices failed; the run ends Failed so Retry (or a rerun) picks them up."""


class RunSummary(BaseModel):
    processed: int
    done: int
    failed: int
    failures: dict[str, str]
    needs_review: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Of prompt_tokens: served from the provider's prompt cache (billed at its price).
    cached_tokens: int = 0
    # LLM cost from the extractor block's price table (None: no price for the model).
    cost: str | None = None
    duplicates: int = 0
    # Sum of invoice totals per currency, as decimal strings (money is never a float).
    totals: dict[str, str] = {}
    # Done invoices by where their fields came from: llm, rules, einvoice.
    by_source: dict[str, int] = {}
    # Claimed but let go unfinished: the claim passed to another run, or the manifest
    # could not be written (the run then fails; the next run records their results).
    skipped: int = 0
    # Batch mode: sent in a provider batch; collect-batches records them later.
    submitted: int = 0
    # The manifest store's own count of lock (slot) acquisitions in this run.
    lock_acquisitions: int = 0


TABLE_COLUMNS = (
    "invoice",
    "status",
    "vendor",
    "total",
    "currency",
    "needs_review",
    "tokens",
    "cost",
    "error",
)


async def summarize(
    params: ProcessInvoicesParams, outcomes: list[InvoiceOutcome], *, lock_acquisitions: int = 0
) -> RunSummary:
    logger = get_run_logger()
    for o in outcomes:
        logger.log(*_log_line(o))
    counts = Counter(o.status for o in outcomes)
    run = run_totals(outcomes)
    totals: dict[str, Decimal] = {}
    for o in outcomes:
        if o.status is Status.done and o.invoice is not None and o.invoice.total is not None:
            currency = o.invoice.currency or "?"
            totals[currency] = totals.get(currency, Decimal(0)) + o.invoice.total
    summary = RunSummary(
        processed=run.invoices,
        done=counts[Status.done],
        failed=counts[Status.failed],
        failures={
            o.key: f"{o.error_kind}: {o.error_message}"
            for o in outcomes
            if o.status is Status.failed
        },
        needs_review=run.needs_review,
        tokens=run.prompt_tokens + run.completion_tokens,
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        cached_tokens=run.cached_tokens,
        cost=str(run.cost) if run.cost is not None else None,
        duplicates=run.duplicates,
        totals={currency: str(total) for currency, total in sorted(totals.items())},
        by_source=run.by_source,
        skipped=len(outcomes) - run.invoices - counts[Status.submitted],
        submitted=counts[Status.submitted],
        lock_acquisitions=lock_acquisitions,
    )
    if outcomes:
        await acreate_table_artifact(
            key="invoices",
            table=[_row(o) for o in outcomes],
            description=f"Invoices processed from `{params.source_prefix}`",
        )
    await acreate_markdown_artifact(
        key="run-summary",
        markdown=_markdown(params, summary),
        description="invoiceflow run summary",
    )
    if summary.failed:
        raise InvoicesFailed(
            f"{summary.failed} of {summary.processed} invoices failed; see the manifest "
            f"{params.manifest_key!r}. First: {next(iter(summary.failures.items()))}"
        )
    return summary


def _log_line(o: InvoiceOutcome) -> tuple[int, str]:
    """One line per invoice outcome. Only fields and our own error text: no secrets."""
    if o.status is Status.done and o.invoice is not None:
        inv = o.invoice
        review = " [needs review]" if o.needs_review else ""
        tokens = _tokens(o)
        used = f" ({tokens} tokens)" if tokens else ""
        return (
            logging.INFO,
            f"done {o.key}: {inv.vendor_name} {inv.total} {inv.currency}{used}{review}",
        )
    if o.status is Status.submitted:
        return logging.INFO, f"submitted {o.key} in a provider batch"
    if not o.finished:
        return logging.WARNING, f"skipped {o.key}: {o.error_kind}: {o.error_message}"
    kind = "transient" if o.transient else "permanent"
    return logging.WARNING, f"failed {o.key} ({kind}): {o.error_kind}: {o.error_message}"


def _tokens(o: InvoiceOutcome) -> int:
    return o.usage.get("prompt_tokens", 0) + o.usage.get("completion_tokens", 0)


def _row(o: InvoiceOutcome) -> dict[str, str]:
    inv = o.invoice
    tokens = _tokens(o)
    return {
        "invoice": o.key,
        "status": o.status.value,
        "vendor": (inv.vendor_name or "") if inv else "",
        "total": str(inv.total) if inv and inv.total is not None else "",
        "currency": (inv.currency or "") if inv else "",
        "needs_review": ("yes" if o.needs_review else "no") if o.finished else "",
        "tokens": str(tokens) if tokens else "",
        "cost": f"{o.cost} {o.cost_currency or ''}".strip() if o.cost is not None else "",
        "error": f"{o.error_kind}: {o.error_message}" if o.error_kind else "",
    }


def _markdown(params: ProcessInvoicesParams, s: RunSummary) -> str:
    lines = [
        f"# invoiceflow run over `{params.source_prefix}`",
        "",
        f"- processed: **{s.processed}**",
        f"- done: **{s.done}**",
        f"- failed: **{s.failed}**",
        f"- needs review: **{s.needs_review}**",
        f"- LLM tokens: **{s.tokens}** ({s.prompt_tokens} in, of which {s.cached_tokens} "
        f"cached; {s.completion_tokens} out)",
        f"- duplicates: **{s.duplicates}**",
    ]
    if s.by_source:
        by = ", ".join(f"{source} {n}" for source, n in sorted(s.by_source.items()))
        lines.append(f"- fields from: **{by}**")
    if s.submitted:
        lines.append(f"- submitted in provider batches: **{s.submitted}**")
    if s.skipped:
        lines.append(f"- skipped (claim lost or not recorded): **{s.skipped}**")
    if s.tokens:
        lines.append(f"- LLM cost: **{s.cost if s.cost is not None else 'unknown (no price)'}**")
    if s.totals:
        lines += ["", "## Invoice totals", "", "| currency | total |", "|---|---:|"]
        lines += [f"| {currency} | {total} |" for currency, total in s.totals.items()]
    if s.failures:
        lines += ["", "## Failures", "", "| invoice | reason |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in s.failures.items()]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Keep a reason inside its markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
