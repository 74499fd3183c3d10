"""Batch mode wiring: the batch run's queue, and the collect-batches flow.

collect-batches polls the provider batches with open records beside the manifest and
records the answers of finished ones through the pipeline's own validate -> write ->
record path (`invoiceflow.batch`). It runs every 10 minutes (prefect.yaml) and at the
end of every online run.
"""

from __future__ import annotations

import asyncio
import logging

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel

from blocks.extractor import ExtractorBlock
from flows.params import ProcessInvoicesParams
from flows.tally import RunTally
from flows.tasks import open_pipeline
from invoiceflow.batch import (
    BatchExtractor,
    BatchProvider,
    BatchQueue,
    BatchRecords,
    CollectReport,
    collect,
)
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoicePipeline, run_totals


class BatchModeUnsupported(ValueError):
    """The run's extractor block cannot send provider batches."""


def _records(pipeline: InvoicePipeline) -> BatchRecords:
    return BatchRecords(pipeline.s3, pipeline.committer.store.key)


async def _batch_mode(
    pipeline: InvoicePipeline, params: ProcessInvoicesParams
) -> tuple[BatchExtractor, BatchProvider]:
    """The extractor block's batch API around the run's extractor."""
    block = await ExtractorBlock.load(params.extractor_block)
    try:
        return block.batch_mode(pipeline.extractor)
    except ValueError as exc:
        message = f"llm_mode='batch' with {params.extractor_block!r}: {exc}"
        raise BatchModeUnsupported(message) from exc


async def batch_queue(pipeline: InvoicePipeline, params: ProcessInvoicesParams) -> BatchQueue:
    """Switch ``pipeline`` to batch mode: LLM requests are queued, not sent."""
    extractor, provider = await _batch_mode(pipeline, params)
    queue = BatchQueue(pipeline, extractor, provider, _records(pipeline))
    pipeline.defer = queue.defer
    return queue


async def finish_llm_requests(
    pipeline: InvoicePipeline,
    params: ProcessInvoicesParams,
    queue: BatchQueue | None,
    tally: RunTally,
) -> None:
    """The end of a run's LLM work. Batch mode (``queue``): send the queued requests as
    provider batches and tally what became of each invoice. Online: collect the
    provider batches that have finished meanwhile."""
    if queue is not None:
        for outcome in await queue.submit():
            tally.add(outcome)
    else:
        await collect_after_online_run(pipeline, params)


async def has_open_batches(pipeline: InvoicePipeline) -> bool:
    """Whether this manifest has batch records (one LIST; online runs then collect)."""
    return bool(await asyncio.to_thread(_records(pipeline).keys))


async def collect_after_online_run(
    pipeline: InvoicePipeline, params: ProcessInvoicesParams
) -> None:
    """An online run's courtesy collect: best effort, never the run's failure (the
    collect-batches schedule tries again in 10 minutes)."""
    try:
        if await has_open_batches(pipeline):
            await collect_open_batches(pipeline, params)
    except Exception as exc:
        get_run_logger().warning("collecting provider batches failed (retried later): %s", exc)


class CollectSummary(BaseModel):
    open_batches: int = 0
    collected_batches: int = 0
    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost: str | None = None


@task(cache_policy=NO_CACHE)
async def collect_open_batches(
    pipeline: InvoicePipeline, params: ProcessInvoicesParams
) -> CollectSummary:
    """Record every finished batch of this manifest (a no-op without open records)."""
    try:
        extractor, provider = await _batch_mode(pipeline, params)
    except BatchModeUnsupported:
        return CollectSummary()  # this block sends no batches, so it has none to collect
    try:
        report = await collect(pipeline, extractor, provider, _records(pipeline))
    finally:
        if (aclose := getattr(provider, "aclose", None)) is not None:
            await aclose()
    summary = summarize_collect(report)
    get_run_logger().info(
        "batches: %d collected, %d still open; %d invoices done, %d failed",
        summary.collected_batches,
        summary.open_batches,
        summary.done,
        summary.failed,
    )
    return summary


def summarize_collect(report: CollectReport) -> CollectSummary:
    recorded = [o for o in report.outcomes if o.recorded]
    totals = run_totals(recorded)
    return CollectSummary(
        open_batches=len(report.open_batches),
        collected_batches=len(report.collected_batches),
        done=sum(o.status is Status.done for o in recorded),
        failed=sum(o.status is Status.failed for o in recorded),
        prompt_tokens=totals.prompt_tokens,
        cached_tokens=totals.cached_tokens,
        completion_tokens=totals.completion_tokens,
        cost=str(totals.cost) if totals.cost is not None else None,
    )


@flow(name="collect-batches")
async def collect_batches(
    params: ProcessInvoicesParams = ProcessInvoicesParams(),
) -> CollectSummary:
    """Record the answers of finished provider batches (see the module docstring)."""
    async with open_pipeline(params) as pipeline:
        return await collect_open_batches(pipeline, params)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(collect_batches())
