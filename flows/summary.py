"""What a run reports: its summary, its artifacts, and a loud failure when invoices failed."""

from __future__ import annotations

from collections import Counter

from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.logging import get_run_logger
from pydantic import BaseModel

from flows.params import ProcessInvoicesParams
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoiceOutcome


class InvoicesFailed(RuntimeError):
    """Some invoices failed; the run ends Failed so Retry (or a rerun) picks them up."""


class RunSummary(BaseModel):
    processed: int
    done: int
    failed: int
    failures: dict[str, str]


async def summarize(params: ProcessInvoicesParams, outcomes: list[InvoiceOutcome]) -> RunSummary:
    logger = get_run_logger()
    for o in outcomes:
        if o.status is Status.done and o.invoice is not None:
            inv = o.invoice
            logger.info("done %s: %s %s %s", o.key, inv.vendor_name, inv.total, inv.currency)
        else:
            logger.warning("failed %s: %s: %s", o.key, o.error_kind, o.error_message)
    counts = Counter(o.status for o in outcomes)
    summary = RunSummary(
        processed=len(outcomes),
        done=counts[Status.done],
        failed=counts[Status.failed],
        failures={
            o.key: f"{o.error_kind}: {o.error_message}"
            for o in outcomes
            if o.status is Status.failed
        },
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


def _row(o: InvoiceOutcome) -> dict[str, str]:
    inv = o.invoice
    return {
        "invoice": o.key,
        "status": o.status.value,
        "vendor": (inv.vendor_name or "") if inv else "",
        "total": str(inv.total) if inv and inv.total is not None else "",
        "currency": (inv.currency or "") if inv else "",
        "error": f"{o.error_kind}: {o.error_message}" if o.error_kind else "",
    }


def _markdown(params: ProcessInvoicesParams, s: RunSummary) -> str:
    lines = [
        f"# invoiceflow run over `{params.source_prefix}`",
        "",
        f"- processed: **{s.processed}**",
        f"- done: **{s.done}**",
        f"- failed: **{s.failed}**",
    ]
    if s.failures:
        lines += ["", "## Failures", "", "| invoice | reason |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s.failures.items()]
    return "\n".join(lines)
