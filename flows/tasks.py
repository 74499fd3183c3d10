"""Tasks of the process-invoices flow. Each is a thin call into `InvoicePipeline`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import SyncClientContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from prefect_aws import S3Bucket

# Imported with the flow rather than at the run's first LLM call: the openai SDK takes
# seconds to import, which would stall the flow's event loop just as the run starts.
import invoiceflow.extractors.openai  # noqa: F401
from blocks.extractor import ExtractorBlock
from flows.llm_limits import provider_limiter
from flows.lock import check_manifest_lock, manifest_lock
from flows.params import ProcessInvoicesParams
from flows.progress import claimed_all, estimate, expect, observe, tracking_progress
from flows.redaction import redact_run_secrets
from flows.runs import flow_run_liveness
from flows.s3 import s3_store, start_loading_s3_models
from flows.server_check import warn_about_lease_storage
from flows.tally import RunTally
from invoiceflow.allocator import bound_heap_growth
from invoiceflow.manifest import GroupCommitter, ManifestStore, Selection
from invoiceflow.pipeline import (
    InvoicePipeline,
    ParsedDoc,
    PipelineConfig,
    WorkItem,
)
from invoiceflow.sandbox import DocumentWorkers, start_fork_server
from invoiceflow.storage import FIRST_LISTING_PAGE_SIZE, LISTING_PAGE_SIZE

T = TypeVar("T")


@contextlib.asynccontextmanager
async def open_pipeline(params: ProcessInvoicesParams) -> AsyncIterator[InvoicePipeline]:
    """Load the blocks, verify the manifest lock, start the document workers, the
    extractor and one group committer."""
    bound_heap_growth()  # a long run's heap follows what it holds, not its length
    warm_up()  # begun when the flow was loaded; a no-op then
    bucket, extractor_block = await load_blocks(params)
    # Built on a thread (a blocking call), beside the provider limits' setup.
    s3, limiter = await asyncio.gather(
        asyncio.to_thread(s3_store, bucket),
        # Provider-wide limits (in flight, RPM, TPM) shared with every run of this block.
        provider_limiter(
            extractor_block, params.extractor_block, max_in_flight=params.max_llm_concurrency
        ),
    )
    lock = manifest_lock(params.manifest_lock, wait_s=params.manifest_lock_wait_s)
    store = ManifestStore(s3, params.manifest_key, lock=lock, max_bytes=params.max_manifest_bytes)
    config = PipelineConfig(
        source_prefix=params.source_prefix,
        results_prefix=params.results_prefix,
        run_id=str(flow_run.id),
        source_suffixes=params.source_suffixes,
        limits=params.document_limits(**extractor_block.vision_limits()),
        claim_timeout=params.claim_timeout,
        max_attempts=params.max_attempts,
    )
    try:
        # One sync API client for every sync task run of this flow: otherwise each
        # parse task on the thread pool builds its own client and SSL context
        # (~100 ms CPU each, upstream PR #19106). httpx.Client is thread-safe.
        with (
            SyncClientContext.get_or_create(),
            # Untrusted document work (and the rules extractor) runs in these
            # processes, under the run's budgets, never on the flow's event loop.
            DocumentWorkers(params.document_workers, config.limits) as workers,
        ):
            extractor = extractor_block.build(limiter=limiter, runner=workers)
            try:
                async with (
                    tracking_progress(),
                    GroupCommitter(
                        store,
                        max_batch=params.max_commit_batch,
                        max_wait_s=params.commit_interval_s,
                        run_id=config.run_id,  # renews this run's claims while it lives
                        renew_every_s=params.claim_renewal_s,
                    ) as committer,
                ):
                    yield InvoicePipeline(
                        s3, committer, extractor, config, flow_run_liveness, read=workers.read
                    )
            finally:
                if (aclose := getattr(extractor, "aclose", None)) is not None:
                    await aclose()
    finally:
        if limiter is not None:
            await limiter.aclose()  # provider slots go back to the other runs now


def warm_up() -> None:
    """Begin, in the background, what a run's first invoice would otherwise wait for:
    the document workers' fork server (~0.7 s of imports: pypdf, pdfium, the schema)
    and S3's service model (~0.2 s, `flows/s3.py`). The flow's module calls this as
    Prefect loads it, so both overlap the engine's own start (creating the run,
    proposing Running) rather than the run's first second."""
    start_fork_server()
    start_loading_s3_models()


async def load_blocks(params: ProcessInvoicesParams) -> tuple[S3Bucket, ExtractorBlock]:
    """The run's blocks, loaded while the manifest lock and the lease storage are
    checked, with their secrets registered for redaction."""
    bucket, extractor_block, *_ = await asyncio.gather(
        S3Bucket.load(params.bucket_block),
        ExtractorBlock.load(params.extractor_block),
        check_manifest_lock(params.manifest_lock),
        warn_about_lease_storage(),  # loud in the run log when leases are per replica
    )
    await redact_run_secrets(bucket, extractor_block, notify=params.failure_notification_block)
    return bucket, extractor_block


# Pipeline objects are live (clients, the committer); they are not cache inputs.
async def claim_invoices(
    pipeline: InvoicePipeline, selection: Selection
) -> AsyncIterator[list[WorkItem]]:
    """List the prefix and claim, in the manifest, the invoices this run processes: a
    listing page at a time (127 keys first, then 1,000), so the first ones start while
    S3 lists on."""
    async for invoices in pipeline.claim_pages(selection, counted=estimate):
        expect(len(invoices))  # towards the progress artifact's 100%
        yield invoices
    claimed_all()


@task(cache_policy=NO_CACHE)
def parse_invoices(items: list[WorkItem], pipeline: InvoicePipeline) -> quote[list[ParsedDoc]]:
    # Quoted, so Prefect links the task's state to the list but not to each document
    # (`link_state_to_result`): an entry per invoice that lived to the end of the run.
    # Passed on as it is, it also keeps Prefect from walking every document (text, page
    # images) on the event loop looking for futures in the next task's inputs.
    return quote(pipeline.parse_many(items))


@task(cache_policy=NO_CACHE)
async def extract_invoices(
    docs: list[ParsedDoc],
    pipeline: InvoicePipeline,
    tally: RunTally,
    finished: Callable[[], None] | None = None,
) -> int:
    """Finish each parsed invoice; its outcome goes into the run's tally (and progress)
    as it arrives, not into a list kept to the end of the run; `finished` is told."""

    async def extract_and_count(doc: ParsedDoc) -> None:
        tally.add(observe(await pipeline.process(doc)))
        if finished is not None:
            finished()

    await asyncio.gather(*(extract_and_count(doc) for doc in docs))
    return len(docs)


# Claimed invoices waiting to be read, at most, before the next page is claimed: ~10 s
# of work at saturation. A claim is a live manifest entry and a work item until its
# invoice finishes, so claiming no further ahead keeps a run over 10,000 invoices about
# as small as one over 1,000, and leaves the rest of the prefix to other runs meanwhile.
CLAIM_AHEAD = LISTING_PAGE_SIZE // 2


class InvoiceWindow:
    """At most `size` invoices parsed and not yet finished; chunks enter in order."""

    def __init__(self) -> None:
        self.size = self.free = 0
        self.queued = 0  # invoices claimed that have not entered yet
        self._freed = asyncio.Event()
        self._entered = asyncio.Event()
        self._turn = asyncio.Lock()  # FIFO: chunks are parsed in the order they come

    def widen(self, size: int) -> None:
        """Make the window `size` invoices, if that is wider than it is."""
        if size > self.size:
            self.free += size - self.size
            self.size = size
            self._freed.set()

    def queue(self, count: int) -> None:
        """`count` more invoices will `enter`."""
        self.queued += count

    async def enter(self, count: int) -> None:
        async with self._turn:
            while self.free < count:
                self._freed.clear()
                await self._freed.wait()
            self.free -= count
        self.queued -= count
        self._entered.set()

    async def queued_below(self, count: int) -> None:
        """Wait until fewer than `count` invoices are queued to enter."""
        while self.queued >= count:
            self._entered.clear()
            await self._entered.wait()

    def leave(self, count: int = 1) -> None:
        self.free += count
        self._freed.set()


async def parse_and_extract(
    pages: AsyncIterator[list[WorkItem]],
    pipeline: InvoicePipeline,
    params: ProcessInvoicesParams,
    tally: RunTally,
    *,
    claim_ahead: int = CLAIM_AHEAD,
) -> None:
    """Each chunk of each page of claimed invoices: parse it on the thread pool, then
    finish its invoices.

    A chunk is parsed only once its invoices fit in the run's window of invoices read
    and not yet finished (each leaves it as it finishes), so documents (text, page
    images) are read only that far ahead of the LLM calls and memory follows what is
    in flight, not the run's size. The next page is claimed once fewer than
    `claim_ahead` claimed invoices wait to enter the window.
    """
    window = InvoiceWindow()

    async def parse_then_extract(chunk: list[WorkItem]) -> None:
        await window.enter(len(chunk))
        left = 0

        def leave(count: int = 1) -> None:
            nonlocal left
            count = min(count, len(chunk) - left)
            left += count
            window.leave(count)

        try:
            docs = await resolved(parse_invoices.submit(chunk, pipeline))
            await extract_invoices(docs, pipeline, tally, leave)
        finally:
            leave(len(chunk))  # what is left of a chunk that failed leaves all the same
            pipeline.first_started.set()  # also when the chunk failed: list on

    claimed = 0
    started: list[asyncio.Task[None]] = []
    try:
        async for invoices in pages:
            # A page as long as was asked for: the listing goes on (it was truncated).
            full = FIRST_LISTING_PAGE_SIZE if claimed == 0 else LISTING_PAGE_SIZE
            chunks = params.chunks(
                invoices, claimed_before=claimed, more_to_come=len(invoices) >= full
            )
            claimed += len(invoices)
            window.widen(params.invoices_in_flight(max(map(len, chunks), default=1)))
            window.queue(len(invoices))
            started += [asyncio.create_task(parse_then_extract(chunk)) for chunk in chunks]
            if started:
                # The next page is listed and claimed once the run's first invoice is
                # `processing` (or finished): its result lookup and `processing` commit,
                # which its LLM call waits on, then neither share the GIL with the
                # listing's XML parsing nor queue behind a claim commit of 1,000 invoices.
                await pipeline.first_started.wait()
            await window.queued_below(claim_ahead)
    finally:
        # A page that cannot be claimed (an unreadable manifest, a lost lock) ends the
        # run, but only once the invoices already claimed are finished.
        finished = await asyncio.gather(*started, return_exceptions=True)
    for outcome in finished:
        if isinstance(outcome, BaseException):
            raise outcome


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
