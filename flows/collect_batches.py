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

from flows.params import ProcessInvoicesParams
from flows.tasks import open_pipeline
from invoiceflow.batch import BatchQueue, BatchRecords, CollectReport, collect
from invoiceflow.extractors.openai import OpenAIExtractor
from invoiceflow.extractors.openai_batch import OpenAIBatches
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoicePipeline, run_totals


class BatchModeUnsupported(ValueError):
    """The run's extractor has no provider batch API here."""


def _records(pipeline: InvoicePipeline) -> BatchRecords:
    return BatchRecords(pipeline.s3, pipeline.committer.store.key)


def batch_queue(pipeline: InvoicePipeline) -> BatchQueue:
    """Switch ``pipeline`` to batch mode: LLM requests are queued, not sent."""
    extractor = pipeline.extractor
    if not isinstance(extractor, OpenAIExtractor):
        raise BatchModeUnsupported(
            f"llm_mode='batch' needs an OpenAI-compatible extractor, not {extractor.name!r}"
        )
    queue = BatchQueue(pipeline, extractor, OpenAIBatches(extractor), _records(pipeline))
    pipeline.defer = queue.defer
    return queue


async def has_open_batches(pipeline: InvoicePipeline) -> bool:
    """Whether this manifest has batch records (one LIST; online runs then collect)."""
    if not isinstance(pipeline.extractor, OpenAIExtractor):
        return False
    return bool(await asyncio.to_thread(_records(pipeline).keys))


async def collect_after_online_run(pipeline: InvoicePipeline) -> None:
    """An online run's courtesy collect: best effort, never the run's failure (the
    collect-batches schedule tries again in 10 minutes)."""
    try:
        if await has_open_batches(pipeline):
            await collect_open_batches(pipeline)
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
async def collect_open_batches(pipeline: InvoicePipeline) -> CollectSummary:
    """Record every finished batch of this manifest (a no-op without open records)."""
    extractor = pipeline.extractor
    if not isinstance(extractor, OpenAIExtractor):
        return CollectSummary()
    provider = OpenAIBatches(extractor)
    try:
        report = await collect(pipeline, extractor, provider, _records(pipeline))
    finally:
        await provider.aclose()
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
        return await collect_open_batches(pipeline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(collect_batches())
