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
    # LLM cost from the extractor block's price table (None: no price for the model).
    cost: str | None = None
    duplicates: int = 0
    # Sum of invoice totals per currency, as decimal strings (money is never a float).
    totals: dict[str, str] = {}


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


async def summarize(params: ProcessInvoicesParams, outcomes: list[InvoiceOutcome]) -> RunSummary:
    logger = get_run_logger()
    for o in outcomes:
        logger.log(*_log_line(o))
    counts = Counter(o.status for o in outcomes)
    llm = run_totals(outcomes)
    totals: dict[str, Decimal] = {}
    for o in outcomes:
        if o.status is Status.done and o.invoice is not None and o.invoice.total is not None:
            currency = o.invoice.currency or "?"
            totals[currency] = totals.get(currency, Decimal(0)) + o.invoice.total
    summary = RunSummary(
        processed=len(outcomes),
        done=counts[Status.done],
        failed=counts[Status.failed],
        failures={
            o.key: f"{o.error_kind}: {o.error_message}"
            for o in outcomes
            if o.status is Status.failed
        },
        needs_review=sum(1 for o in outcomes if _needs_review(o)),
        tokens=sum(_tokens(o) or 0 for o in outcomes),
        prompt_tokens=llm.prompt_tokens,
        completion_tokens=llm.completion_tokens,
        cost=str(llm.cost) if llm.cost is not None else None,
        duplicates=llm.duplicates,
        totals={currency: str(total) for currency, total in sorted(totals.items())},
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
        review = " [needs review]" if _needs_review(o) else ""
        tokens = _tokens(o)
        used = f" ({tokens} tokens)" if tokens else ""
        return (
            logging.INFO,
            f"done {o.key}: {inv.vendor_name} {inv.total} {inv.currency}{used}{review}",
        )
    kind = "transient" if o.transient else "permanent"
    return logging.WARNING, f"failed {o.key} ({kind}): {o.error_kind}: {o.error_message}"


# The LLM engineer is adding review flags, usage and cost to the outcome; read them when
# they are there, so the columns fill in without this module changing.
def _needs_review(o: InvoiceOutcome) -> bool | None:
    for source in (o, o.invoice):
        value = getattr(source, "needs_review", None)
        if value is not None:
            return bool(value)
    return None


def _tokens(o: InvoiceOutcome) -> int | None:
    usage = getattr(o, "usage", None)
    if not usage:
        return None
    if isinstance(usage, dict):
        if "total_tokens" in usage:
            return int(usage["total_tokens"])
        return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
    total = getattr(usage, "total_tokens", None)
    return int(total) if total is not None else None


def _cost(o: InvoiceOutcome) -> str:
    cost = getattr(o, "cost", None)
    if cost is None:
        return ""
    currency = getattr(o, "cost_currency", None) or ""
    return f"{cost} {currency}".strip()


def _row(o: InvoiceOutcome) -> dict[str, str]:
    inv = o.invoice
    review = _needs_review(o)
    tokens = _tokens(o)
    return {
        "invoice": o.key,
        "status": o.status.value,
        "vendor": (inv.vendor_name or "") if inv else "",
        "total": str(inv.total) if inv and inv.total is not None else "",
        "currency": (inv.currency or "") if inv else "",
        "needs_review": "" if review is None else ("yes" if review else "no"),
        "tokens": "" if tokens is None else str(tokens),
        "cost": _cost(o),
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
        f"- LLM tokens: **{s.tokens}** ({s.prompt_tokens} in, {s.completion_tokens} out)",
        f"- duplicates: **{s.duplicates}**",
    ]
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
