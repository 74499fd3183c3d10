"""What a run reports: its summary, its artifacts, and a loud failure when invoices failed."""

from __future__ import annotations

from collections.abc import Iterable

from prefect.artifacts import acreate_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.logging import get_run_logger
from prefect.utilities.context import get_task_and_flow_run_ids
from pydantic import BaseModel

from flows.params import ProcessInvoicesParams
from flows.tally import RunTally, TableRows
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoiceOutcome


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
    # Manifest entries that are not well-formed, set aside untouched (another prefix's
    # hand edit, say); `invoiceflow reconcile --rebuild` repairs them.
    malformed_entries: list[str] = []


async def summarize(
    params: ProcessInvoicesParams,
    outcomes: RunTally | Iterable[InvoiceOutcome],
    *,
    lock_acquisitions: int = 0,
    malformed_entries: list[str] | None = None,
) -> RunSummary:
    """The run's summary and artifacts, from a `RunTally` the run fed as invoices
    finished (or from outcomes, which are then logged here)."""
    tally = outcomes if isinstance(outcomes, RunTally) else RunTally.of(outcomes, get_run_logger())
    counts = tally.statuses
    summary = RunSummary(
        processed=tally.finished,
        done=counts[Status.done],
        failed=counts[Status.failed],
        failures=tally.failures,
        needs_review=tally.needs_review,
        tokens=tally.prompt_tokens + tally.completion_tokens,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        cached_tokens=tally.cached_tokens,
        cost=str(tally.cost) if tally.cost is not None else None,
        duplicates=tally.duplicates,
        totals={currency: str(total) for currency, total in sorted(tally.totals.items())},
        by_source=dict(tally.by_source),
        skipped=tally.observed - tally.finished - counts[Status.submitted],
        submitted=counts[Status.submitted],
        lock_acquisitions=lock_acquisitions,
        malformed_entries=malformed_entries or [],
    )
    if tally.rows:
        await create_table_artifact("invoices", tally.rows, _table_description(params, tally.rows))
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


async def create_table_artifact(key: str, rows: TableRows, description: str) -> None:
    """`acreate_table_artifact`, from rows kept as JSON: it would take a list of dicts,
    copy it (NaN sanitizing) and encode it, ~20 MB at the end of a 10,000-invoice run."""
    task_run_id, flow_run_id = get_task_and_flow_run_ids()
    artifact = ArtifactCreate(
        type="table",
        key=key,
        description=description,
        data=rows.json(),
        flow_run_id=flow_run_id,
        task_run_id=task_run_id,
    )
    async with get_client() as client:
        await client.create_artifact(artifact=artifact)


def _table_description(params: ProcessInvoicesParams, rows: TableRows) -> str:
    description = f"Invoices processed from `{params.source_prefix}`"
    if rows.total > len(rows):
        description += (
            f": {len(rows)} of {rows.total} shown, those that need a look first; the "
            f"manifest `{params.manifest_key}` has every invoice"
        )
    return description


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
    if s.malformed_entries:
        shown = ", ".join(f"`{k}`" for k in s.malformed_entries[:5])
        lines.append(
            f"- malformed manifest entries set aside: **{len(s.malformed_entries)}** ({shown}); "
            "repair with `invoiceflow reconcile --rebuild`"
        )
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
