"""Tasks of the process-invoices flow. Each is a thin call into `InvoicePipeline`."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import SyncClientContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect_aws import S3Bucket

# Imported with the flow rather than at the run's first LLM call: the openai SDK takes
# seconds to import, which would stall the flow's event loop just as the run starts.
import invoiceflow.extractors.openai  # noqa: F401
from blocks.extractor import ExtractorBlock
from flows.llm_limits import provider_limiter
from flows.lock import check_manifest_lock, manifest_lock
from flows.params import ProcessInvoicesParams
from flows.progress import expect, observe, tracking_progress
from flows.redaction import redact_run_secrets
from invoiceflow.manifest import GroupCommitter, ManifestStore, Selection
from invoiceflow.pipeline import (
    InvoiceOutcome,
    InvoicePipeline,
    ParsedDoc,
    PipelineConfig,
    WorkItem,
)
from invoiceflow.storage import S3Store

T = TypeVar("T")


@contextlib.asynccontextmanager
async def open_pipeline(params: ProcessInvoicesParams) -> AsyncIterator[InvoicePipeline]:
    """Load the blocks, verify the manifest lock, and run one group committer."""
    await check_manifest_lock(params.manifest_lock)
    bucket = await S3Bucket.load(params.bucket_block)
    extractor_block = await ExtractorBlock.load(params.extractor_block)
    await redact_run_secrets(bucket, extractor_block, notify=params.failure_notification_block)
    s3 = S3Store(bucket.credentials.get_s3_client(), bucket.bucket_name)
    store = ManifestStore(s3, params.manifest_key, lock=manifest_lock(params.manifest_lock))
    # Provider-wide limits (in flight, RPM, TPM) shared with every run using this block.
    limiter = await provider_limiter(
        extractor_block, params.extractor_block, max_in_flight=params.max_llm_concurrency
    )
    extractor = extractor_block.build(limiter=limiter)
    config = PipelineConfig(
        source_prefix=params.source_prefix,
        results_prefix=params.results_prefix,
        run_id=str(flow_run.id),
        max_concurrency=params.max_llm_concurrency,
        max_pdf_bytes=params.max_pdf_bytes,
        max_pages=params.max_pages,
    )
    try:
        # One sync API client for every sync task run of this flow: otherwise each
        # parse task on the thread pool builds its own client and SSL context
        # (~100 ms CPU each, upstream PR #19106). httpx.Client is thread-safe.
        with SyncClientContext.get_or_create():
            async with (
                tracking_progress(),
                GroupCommitter(
                    store, max_batch=params.max_commit_batch, max_wait_s=params.commit_interval_s
                ) as committer,
            ):
                yield InvoicePipeline(s3, committer, extractor, config, finished_flow_runs)
    finally:
        aclose = getattr(extractor, "aclose", None)
        if aclose is not None:
            await aclose()
        if limiter is not None:
            await limiter.aclose()  # provider slots go back to the other runs now


async def finished_flow_runs(run_ids: set[str]) -> set[str]:
    """Which of these flow runs have ended (completed, failed, crashed, cancelled).

    A claim held by such a run will never be finished by it, so the pipeline takes it
    over. Unknown ids (another server, deleted runs) are not assumed dead.
    """
    ids = []
    for run_id in run_ids:
        with contextlib.suppress(ValueError):
            ids.append(uuid.UUID(run_id))
    if not ids:
        return set()
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
    return {str(r.id) for r in runs if r.state is not None and r.state.is_final()}


# Pipeline objects are live (clients, the committer); they are not cache inputs.
@task(cache_policy=NO_CACHE)
async def list_invoices(pipeline: InvoicePipeline, selection: Selection) -> list[WorkItem]:
    items = await pipeline.select(selection)
    expect(len(items))  # the progress artifact's 100%
    return items


@task(cache_policy=NO_CACHE)
def parse_invoices(items: list[WorkItem], pipeline: InvoicePipeline) -> list[ParsedDoc]:
    return pipeline.parse_many(items)


@task(cache_policy=NO_CACHE)
async def extract_invoices(
    docs: list[ParsedDoc], pipeline: InvoicePipeline
) -> list[InvoiceOutcome]:
    async def extract_and_count(doc: ParsedDoc) -> InvoiceOutcome:
        return observe(await pipeline.extract(doc))

    return list(await asyncio.gather(*(extract_and_count(doc) for doc in docs)))


async def extract_when_parsed(
    parsed: PrefectFuture[list[ParsedDoc]], pipeline: InvoicePipeline
) -> list[InvoiceOutcome]:
    return await extract_invoices(await resolved(parsed), pipeline)


async def resolved(future: PrefectFuture[T]) -> T:
    """Await a thread-pool task's result without blocking the loop or an executor thread.

    `asyncio.to_thread(future.result)` would park a default-executor thread per pending
    future; with ~50 chunks those threads were all taken, and every S3 write and
    manifest commit (which also use `to_thread`) queued behind the slowest parse.
    """
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(done.set))
    await done.wait()
    return future.result()
