"""Process the invoice PDFs under an S3 prefix into one JSON result each.

invoices = claim_invoices(prefix)          # claim new ones in the manifest, page by page
for each chunk, a bounded window of chunks at a time:
    parsed = parse_invoices(chunk)         # download + read, on the thread pool
    extract_invoices(parsed)               # per invoice: extract, validate, write, record
finish_llm_requests(queue)                 # batch: send the queued requests as provider
                                           # batches; online: collect finished batches
every status change is group-committed to the manifest under a slot of size one
"""

from __future__ import annotations

import asyncio

from prefect import flow
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.collect_batches import batch_queue, finish_llm_requests
from flows.notify import notify_failure
from flows.params import PARSE_THREADS, ProcessInvoicesParams
from flows.summary import RunSummary, summarize
from flows.tally import RunTally
from flows.tasks import claim_invoices, open_pipeline, parse_and_extract, warm_up

warm_up()  # the document workers and S3's model, while Prefect loads this flow


@flow(
    name="process-invoices",
    task_runner=ThreadPoolTaskRunner(max_workers=PARSE_THREADS),
    on_failure=[notify_failure],
)
async def process_invoices(
    params: ProcessInvoicesParams = ProcessInvoicesParams(),
) -> RunSummary:
    # Outcomes are tallied as invoices finish; none is kept to the end (issue 13 #4).
    tally = RunTally(get_run_logger())
    async with open_pipeline(params) as pipeline:
        queue = await batch_queue(pipeline, params) if params.llm_mode == "batch" else None
        invoices = claim_invoices(pipeline, params.selection)
        await parse_and_extract(invoices, pipeline, params, tally)
        await finish_llm_requests(pipeline, params, queue, tally)
    return await summarize(
        params,
        tally,
        lock_acquisitions=pipeline.lock_acquisitions,
        malformed_entries=pipeline.committer.store.malformed,
    )


if __name__ == "__main__":
    asyncio.run(process_invoices())
