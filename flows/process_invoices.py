"""Process the invoice PDFs under an S3 prefix into one JSON result each.

invoices = claim_invoices(prefix)          # claim new ones in the manifest
parsed   = parse_invoices.map(chunks)      # download + read, on the thread pool
results  = extract_invoices(parsed)        # per invoice: extract, validate, write, record
finish_llm_requests(queue)                 # batch: send the queued requests as provider
                                           # batches; online: collect finished batches
every status change is group-committed to the manifest under a slot of size one
"""

from __future__ import annotations

import asyncio

from prefect import flow, unmapped
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.collect_batches import batch_queue, finish_llm_requests
from flows.notify import notify_failure
from flows.params import ProcessInvoicesParams
from flows.summary import RunSummary, summarize
from flows.tally import RunTally
from flows.tasks import claim_invoices, extract_when_parsed, open_pipeline, parse_invoices


# Parse threads only download and wait on the document worker processes (which do the
# CPU work, off this process's GIL), so a few of them keep the pool busy.
@flow(
    name="process-invoices",
    task_runner=ThreadPoolTaskRunner(max_workers=4),
    on_failure=[notify_failure],
)
async def process_invoices(
    params: ProcessInvoicesParams = ProcessInvoicesParams(),
) -> RunSummary:
    # Outcomes are tallied as invoices finish; none is kept to the end (issue 13 #4).
    tally = RunTally(get_run_logger())
    async with open_pipeline(params) as pipeline:
        queue = await batch_queue(pipeline, params) if params.llm_mode == "batch" else None
        invoices = await claim_invoices(pipeline, params.selection)
        parsing = list(parse_invoices.map(params.chunks(invoices), unmapped(pipeline)))
        await asyncio.gather(
            *(extract_when_parsed(parsing, i, pipeline, tally) for i in range(len(parsing)))
        )
        await finish_llm_requests(pipeline, params, queue, tally)
    return await summarize(
        params,
        tally,
        lock_acquisitions=pipeline.lock_acquisitions,
        malformed_entries=pipeline.committer.store.malformed,
    )


if __name__ == "__main__":
    asyncio.run(process_invoices())
