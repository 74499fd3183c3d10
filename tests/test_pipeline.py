"""The per-invoice path on real S3 (moto) with no Prefect: isolation, reuse, claims.

The extractor here is a counting stand-in around the offline rules extractor, so each
test can say exactly how many extractor (i.e. billed LLM) calls an invoice cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support import wait_until

from invoiceflow import pipeline as pipeline_module
from invoiceflow.extractors import Extraction
from invoiceflow.extractors.rules import extract_invoice
from invoiceflow.manifest import Claim, GroupCommitter, ManifestStore, Status
from invoiceflow.pipeline import InvoiceOutcome, InvoicePipeline, PipelineConfig
from invoiceflow.samples import generate_corpus
from invoiceflow.schema import Invoice
from invoiceflow.storage import S3Object, S3Store


class CountingExtractor:
    """The rules extractor, counting calls per invoice.

    `crash_on` keys raise an unexpected exception; `poison` keys get an extraction that
    the test's validator chokes on (a stand-in for any bug past the extractor).
    """

    name = "counting"

    def __init__(
        self, crash_on: frozenset[str] = frozenset(), poison: frozenset[str] = frozenset()
    ) -> None:
        self.calls: Counter[str] = Counter()
        self.crash_on = crash_on
        self.poison = poison

    async def extract(self, text: str) -> Invoice:
        return extract_invoice(text)

    async def extract_document(
        self, text: str, *, pages: int | None = None, invoice_key: str | None = None
    ) -> Extraction:
        assert invoice_key is not None
        self.calls[invoice_key] += 1
        if invoice_key in self.crash_on:
            raise KeyError("a bug in an extractor")
        notes = (POISON,) if invoice_key in self.poison else ()
        return Extraction(extract_invoice(text), "rules", self.name, notes=notes)


POISON = "poison"


class FailingLock:
    """A lock factory that works `works` times (or until `gone` is set), then fails like
    a deleted Prefect limit."""

    def __init__(self, works: int = 1_000_000) -> None:
        self.left = works
        self.gone = False
        self.lock = asyncio.Lock()

    def __call__(self) -> contextlib.AbstractAsyncContextManager[Any]:
        self.left -= 1
        if self.left < 0 or self.gone:
            raise RuntimeError("the manifest lock is gone")
        return self.lock


class LockGoneOnceAllCalled(CountingExtractor):
    """Every call waits until all `n` have started (so every `processing` commit took
    the lock); then the lock goes, before any result can be recorded `done`."""

    def __init__(self, n: int, lock: FailingLock) -> None:
        super().__init__()
        self.n = n
        self.lock = lock
        self.all_started = asyncio.Event()

    async def extract_document(
        self, text: str, *, pages: int | None = None, invoice_key: str | None = None
    ) -> Extraction:
        if sum(self.calls.values()) + 1 >= self.n:
            self.lock.gone = True
            self.all_started.set()
        extraction = await super().extract_document(text, pages=pages, invoice_key=invoice_key)
        await self.all_started.wait()
        return extraction


def upload(s3: S3Store, prefix: str, n: int, seed: int = 5) -> list[str]:
    keys = []
    for stem, pdf, _ in generate_corpus(n, seed=seed):
        s3.put(f"{prefix}{stem}.pdf", pdf, content_type="application/pdf")
        keys.append(f"{prefix}{stem}.pdf")
    return keys


@contextlib.asynccontextmanager
async def running_pipeline(
    s3: S3Store,
    prefix: str,
    extractor: CountingExtractor,
    *,
    run_id: str = "run-1",
    lock: Callable[[], Any] = asyncio.Lock,
    max_wait_s: float = 0.05,
) -> AsyncIterator[InvoicePipeline]:
    store = ManifestStore(s3, f"{prefix}manifest.json", lock=lock)
    config = PipelineConfig(prefix, f"{prefix}results/", run_id)
    async with GroupCommitter(store, max_wait_s=max_wait_s) as committer:
        yield InvoicePipeline(s3, committer, extractor, config)


async def run_all(pipeline: InvoicePipeline) -> dict[str, InvoiceOutcome]:
    items = await pipeline.claim()
    outcomes = await asyncio.gather(*(pipeline.process(pipeline.parse(i)) for i in items))
    return {o.key: o for o in outcomes}


def entries(s3: S3Store, prefix: str) -> dict[str, dict[str, Any]]:
    return ManifestStore(s3, f"{prefix}manifest.json", lock=asyncio.Lock).read_sync().entries


async def test_a_crash_in_any_step_fails_only_its_invoice_permanently(
    s3_store: S3Store, unique_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = upload(s3_store, unique_prefix, 4)
    extractor_bug, validate_bug = keys[0], keys[1]
    validate = pipeline_module.validate_extraction

    def validate_or_crash(extraction: Extraction, text: str) -> Any:
        if POISON in extraction.notes:  # what InvalidOperation did before the fix
            raise ArithmeticError("[<class 'decimal.InvalidOperation'>]")
        return validate(extraction, text)

    monkeypatch.setattr(pipeline_module, "validate_extraction", validate_or_crash)
    extractor = CountingExtractor(
        crash_on=frozenset({extractor_bug}), poison=frozenset({validate_bug})
    )
    async with running_pipeline(s3_store, unique_prefix, extractor) as pipeline:
        outcomes = await run_all(pipeline)

    manifest = entries(s3_store, unique_prefix)
    assert {k: manifest[k]["status"] for k in keys[2:]} == {k: "done" for k in keys[2:]}
    for key, message in ((extractor_bug, "KeyError"), (validate_bug, "ArithmeticError")):
        assert outcomes[key].status is Status.failed
        entry = manifest[key]
        assert (entry["status"], entry["error_kind"], entry["transient"]) == (
            "failed",
            "internal_error",
            False,
        )
        assert message in entry["error_message"]

    # Permanent: a rerun bills neither again.
    async with running_pipeline(s3_store, unique_prefix, extractor, run_id="run-2") as pipeline:
        assert await pipeline.claim() == []
    assert extractor.calls == {k: 1 for k in keys}


async def test_an_invoice_is_started_beside_its_result_lookup(
    s3_store: S3Store, unique_prefix: str
) -> None:
    """Its `processing` commit does not wait for the result lookup (issue 13 #3: both
    are round trips before the first LLM call)."""
    upload(s3_store, unique_prefix, 1)
    writes_during_lookup: list[int] = []

    class SlowResultLookups(S3Store):  # our own store, slow to answer a result read
        def get(self, key: str, *, max_bytes: int | None = None) -> S3Object:
            if key.startswith(f"{unique_prefix}results/"):
                before = pipeline.committer.store.writes
                time.sleep(0.5)
                writes_during_lookup.append(pipeline.committer.store.writes - before)
            return super().get(key, max_bytes=max_bytes)

    slow = SlowResultLookups(s3_store.client, s3_store.bucket)
    extractor = CountingExtractor()
    async with running_pipeline(slow, unique_prefix, extractor) as pipeline:
        outcomes = await run_all(pipeline)

    assert [o.status for o in outcomes.values()] == [Status.done]
    assert writes_during_lookup == [1]  # the `processing` commit, while the lookup ran


async def test_results_written_before_a_lost_lock_are_recorded_later_without_a_call(
    s3_store: S3Store, unique_prefix: str
) -> None:
    """Crash between the result write and the `done` commit (here: the lock vanishes)."""
    keys = upload(s3_store, unique_prefix, 6)
    # The claim and the `processing` commits take the lock; every later commit fails.
    lock = FailingLock()
    extractor = LockGoneOnceAllCalled(len(keys), lock)
    with pytest.raises(RuntimeError, match="lock is gone"):
        async with running_pipeline(
            s3_store, unique_prefix, extractor, lock=lock, max_wait_s=1.0
        ) as pipeline:
            items = await pipeline.claim()
            docs = [pipeline.parse(i) for i in items]
            outcomes = await asyncio.gather(*(pipeline.process(d) for d in docs))
            late = await pipeline.process(docs[0])  # started after the failure
    assert {o.status for o in outcomes} == {Status.pending}
    assert not any(o.recorded for o in outcomes)
    assert late.error_kind == "not_recorded"
    calls_before = sum(extractor.calls.values())
    assert calls_before == len(keys)  # each in flight finished its one call
    assert {e["status"] for e in entries(s3_store, unique_prefix).values()} == {"processing"}

    # Retry of the same run: every invoice is recorded from its result, no call.
    async with running_pipeline(s3_store, unique_prefix, extractor) as pipeline:
        outcomes = await run_all(pipeline)
    assert {o.status for o in outcomes.values()} == {Status.done}
    assert all(o.recorded for o in outcomes.values())
    assert sum(extractor.calls.values()) == calls_before
    assert {e["status"] for e in entries(s3_store, unique_prefix).values()} == {"done"}


async def test_a_deleted_manifest_re_bills_nothing(s3_store: S3Store, unique_prefix: str) -> None:
    keys = upload(s3_store, unique_prefix, 5)
    extractor = CountingExtractor()
    async with running_pipeline(s3_store, unique_prefix, extractor) as pipeline:
        await run_all(pipeline)
    before = entries(s3_store, unique_prefix)
    s3_store.client.delete_object(Bucket=s3_store.bucket, Key=f"{unique_prefix}manifest.json")

    async with running_pipeline(s3_store, unique_prefix, extractor, run_id="run-2") as pipeline:
        outcomes = await run_all(pipeline)
    assert extractor.calls == {k: 1 for k in keys}
    after = entries(s3_store, unique_prefix)
    assert {k: e["status"] for k, e in after.items()} == {k: "done" for k in keys}
    assert {k: e["result_key"] for k, e in after.items()} == {
        k: e["result_key"] for k, e in before.items()
    }
    # Nothing was billed in the second run.
    assert all(not o.usage and o.cost is None for o in outcomes.values())


async def test_selection_all_extracts_again_despite_a_written_result(
    s3_store: S3Store, unique_prefix: str
) -> None:
    keys = upload(s3_store, unique_prefix, 2)
    extractor = CountingExtractor()
    async with running_pipeline(s3_store, unique_prefix, extractor) as pipeline:
        await run_all(pipeline)
    async with running_pipeline(s3_store, unique_prefix, extractor, run_id="run-2") as pipeline:
        items = await pipeline.claim("all")
        await asyncio.gather(*(pipeline.process(pipeline.parse(i)) for i in items))
    assert extractor.calls == {k: 2 for k in keys}


async def test_an_invoice_whose_claim_was_taken_over_is_never_extracted(
    s3_store: S3Store, unique_prefix: str
) -> None:
    keys = upload(s3_store, unique_prefix, 3)
    extractor = CountingExtractor()
    async with running_pipeline(s3_store, unique_prefix, extractor) as pipeline:
        items = await pipeline.claim()
        docs = [pipeline.parse(i) for i in items]
        # Another run decides this run is dead and takes one invoice over.
        taken = docs[0].item
        store = pipeline.committer.store
        (took,) = await store.commit(
            [Claim(taken.key, taken.etag, "run-2", abandoned_runs=frozenset({"run-1"}))]
        )
        assert took.applied
        outcomes = await asyncio.gather(*(pipeline.process(d) for d in docs))
    lost = outcomes[0]
    assert (lost.status, lost.recorded, lost.error_kind) == (Status.pending, False, "claim_lost")
    assert extractor.calls == {k: 1 for k in keys if k != taken.key}
    entry = entries(s3_store, unique_prefix)[taken.key]
    assert (entry["status"], entry["run_id"], entry["attempts"]) == ("pending", "run-2", 2)


async def test_the_run_does_not_wait_out_the_commit_window(
    s3_store: S3Store, unique_prefix: str
) -> None:
    """The committer commits as soon as every invoice waits on it, not after 30 s."""
    upload(s3_store, unique_prefix, 3)
    extractor = CountingExtractor()
    started = time.monotonic()
    async with running_pipeline(s3_store, unique_prefix, extractor, max_wait_s=30) as pipeline:
        items = await pipeline.claim()  # the claim batch waits the window: no producers yet
        claimed = time.monotonic()
        docs = [pipeline.parse(i) for i in items]
        outcomes = await asyncio.gather(*(pipeline.process(d) for d in docs))
    assert {o.status for o in outcomes} == {Status.done}
    # processing + done commits, each flushed at once (generous for a loaded machine).
    assert time.monotonic() - claimed < 10, time.monotonic() - started


async def test_a_document_over_its_time_budget_fails_alone_in_the_worker_pool(
    s3_store: S3Store, unique_prefix: str
) -> None:
    """The parse step reads through `DocumentWorkers`: a hostile PDF is killed at the
    time limit and fails permanently (`too_slow`); the other invoices are done."""
    from sandbox_support import text_operator_bomb

    from invoiceflow.documents import DocumentLimits
    from invoiceflow.sandbox import DocumentWorkers

    keys = upload(s3_store, unique_prefix, 3)
    slow = f"{unique_prefix}slow.pdf"
    s3_store.put(slow, text_operator_bomb(600_000), content_type="application/pdf")
    limits = DocumentLimits(time_limit_s=2, max_text_operators=10**9)  # no pre-check
    extractor = CountingExtractor()
    store = ManifestStore(s3_store, f"{unique_prefix}manifest.json", lock=asyncio.Lock)
    config = PipelineConfig(unique_prefix, f"{unique_prefix}results/", "run-1", limits=limits)
    with DocumentWorkers(2, limits) as workers:
        async with GroupCommitter(store, max_wait_s=0.05) as committer:
            pipeline = InvoicePipeline(s3_store, committer, extractor, config, read=workers.read)
            items = await pipeline.claim()
            docs = await asyncio.gather(*(asyncio.to_thread(pipeline.parse, i) for i in items))
            outcomes = {o.key: o for o in await asyncio.gather(*map(pipeline.process, docs))}

    assert {k: outcomes[k].status for k in keys} == {k: Status.done for k in keys}
    failed = outcomes[slow]
    assert (failed.status, failed.error_kind, failed.transient) == (
        Status.failed,
        "too_slow",
        False,
    )
    assert "2" in (failed.error_message or "")  # names the limit
    assert slow not in extractor.calls


async def test_a_transient_failure_gives_up_after_the_attempt_cap(
    s3_store: S3Store, unique_prefix: str
) -> None:
    from invoiceflow.extractors import ExtractionError

    (key,) = upload(s3_store, unique_prefix, 1)

    class Overloaded(CountingExtractor):
        async def extract_document(self, text: str, **kwargs: Any) -> Extraction:
            await super().extract_document(text, **kwargs)
            raise ExtractionError("server_error", "503 from the provider", transient=True)

    extractor = Overloaded()
    store = ManifestStore(s3_store, f"{unique_prefix}manifest.json", lock=asyncio.Lock)
    for run in range(3):
        config = PipelineConfig(unique_prefix, f"{unique_prefix}results/", f"run-{run}")
        config = dataclasses.replace(config, max_attempts=2)
        async with GroupCommitter(store, max_wait_s=0.05) as committer:
            await run_all(InvoicePipeline(s3_store, committer, extractor, config))
    entry = entries(s3_store, unique_prefix)[key]
    assert extractor.calls == {key: 2}
    assert (entry["status"], entry["attempts"], entry["transient"]) == ("gave_up", 2, False)
    assert (entry["error_kind"], entry["error_message"]) == (
        "server_error",
        "503 from the provider",
    )


async def test_an_unforeseen_error_quoting_a_secret_is_recorded_masked(
    s3_store: S3Store, unique_prefix: str
) -> None:
    from invoiceflow.redact import register_secrets

    secret = "sk-pipeline-" + "f00d" * 8
    register_secrets(secret)
    (key,) = upload(s3_store, unique_prefix, 1)

    class Leaky(CountingExtractor):
        async def extract_document(self, text: str, **kwargs: Any) -> Extraction:
            raise RuntimeError(f"401 Incorrect API key provided: {secret}")

    async with running_pipeline(s3_store, unique_prefix, Leaky()) as pipeline:
        (outcome,) = (await run_all(pipeline)).values()
    entry = entries(s3_store, unique_prefix)[key]
    assert entry["error_kind"] == "internal_error" and "[REDACTED]" in entry["error_message"]
    assert secret not in entry["error_message"] and secret not in (outcome.error_message or "")


def test_chunks_ramp_up_then_hold_their_size() -> None:
    from invoiceflow.pipeline import chunked

    items = list(range(100))
    ramped = chunked(items, 20, ramp=True)
    assert [len(c) for c in ramped] == [1, 2, 4, 8, 16, 20, 20, 20, 9]
    assert [i for c in ramped for i in c] == items  # every item once, in order
    assert [len(c) for c in chunked(items, 30)] == [30, 30, 30, 10]


def test_the_parse_window_follows_the_llm_concurrency_not_the_run_size() -> None:
    """Issue 13 #4: documents are read only a bounded distance ahead of the LLM."""
    from flows.params import PARSE_THREADS, ProcessInvoicesParams

    params = ProcessInvoicesParams(max_llm_concurrency=32)
    for n in (1_000, 10_000, 100_000):
        chunks = params.chunks(list(range(1000)), claimed_before=n - 1000)
        size = max(map(len, chunks))
        assert size <= 100
        # Whatever the number of invoices: the parse threads' chunks plus 4x C.
        assert params.invoices_in_flight(size) <= PARSE_THREADS * 100 + 4 * 32


def test_the_invoices_waiting_for_the_llm_are_capped_at_high_concurrency() -> None:
    """Issue 13 #4: at C=256 a 2-core run is CPU-bound; 3 x C invoices waiting for a
    slot held ~10 KB each and bought no throughput, so at most 256 wait."""
    from flows.params import MAX_WAITING_INVOICES, PARSE_THREADS, ProcessInvoicesParams

    assert ProcessInvoicesParams(max_llm_concurrency=32).invoices_in_flight(20) == 4 * 20 + 4 * 32
    wide = ProcessInvoicesParams(max_llm_concurrency=256).invoices_in_flight(100)
    assert wide == PARSE_THREADS * 100 + 256 + MAX_WAITING_INVOICES == 912


async def test_the_invoice_window_admits_chunks_in_order_as_invoices_finish() -> None:
    from flows.tasks import InvoiceWindow

    window = InvoiceWindow()
    window.widen(10)
    entered: list[str] = []

    async def chunk(name: str, count: int) -> None:
        await window.enter(count)
        entered.append(name)

    await window.enter(8)
    later = [asyncio.create_task(chunk(name, n)) for name, n in (("a", 5), ("b", 1))]
    await asyncio.sleep(0.01)
    assert entered == []  # "b" would fit, but waits its turn behind "a"
    for _ in range(3):
        window.leave()
    await asyncio.sleep(0.01)
    assert entered == ["a"] and window.free == 0
    window.leave()
    await asyncio.gather(*later)
    assert entered == ["a", "b"] and window.free == 0
    waiting = asyncio.create_task(chunk("c", 3))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    window.widen(13)  # a later page's larger chunks: the window grows, never shrinks
    await asyncio.wait_for(waiting, 5)
    window.widen(4)
    assert entered == ["a", "b", "c"] and (window.size, window.free) == (13, 0)


def test_chunks_grow_with_what_the_run_has_claimed_and_only_its_first_page_ramps() -> None:
    from flows.params import ProcessInvoicesParams

    params = ProcessInvoicesParams()
    first = params.chunks(list(range(1000)))
    assert [len(c) for c in first[:6]] == [1, 2, 4, 8, 16, 20]  # ~50 chunks of 1,000
    full = params.chunks(list(range(1000)), more_to_come=True)  # at least 2,000 then
    assert [len(c) for c in full[:7]] == [1, 2, 4, 8, 16, 32, 40]
    later = params.chunks(list(range(1000)), claimed_before=4000)
    assert {len(c) for c in later} == {100}  # 5,000 claimed so far: chunks of 100


async def test_a_run_lists_its_next_page_once_its_first_invoice_is_processing(
    local_stack: Any, s3_store: S3Store, unique_prefix: str
) -> None:
    """The first LLM call waits neither behind the next page's claim commit nor beside
    its listing (issue 13 #3: the first LLM call within 1.5 s at 5,000 invoices)."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.params import ProcessInvoicesParams
    from flows.tally import RunTally
    from flows.tasks import parse_and_extract

    keys = upload(s3_store, unique_prefix, 4)
    extractor = CountingExtractor()
    started_when_asked: list[bool] = []

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    async def run() -> RunTally:
        tally = RunTally()
        async with running_pipeline(s3_store, unique_prefix, extractor) as pipeline:

            async def pages() -> AsyncIterator[list[Any]]:
                async for page in pipeline.claim_pages(page_size=2, first_page_size=1):
                    yield page
                    # Resumed when the flow asks for the next page.
                    started_when_asked.append(pipeline.first_started.is_set())

            await parse_and_extract(pages(), pipeline, ProcessInvoicesParams(), tally)
        return tally

    tally = await run()
    assert tally.statuses[Status.done] == len(keys)
    assert extractor.calls == {k: 1 for k in keys}
    assert len(started_when_asked) >= 3 and all(started_when_asked), started_when_asked


async def test_a_run_claims_the_next_page_only_when_its_claims_run_short(
    local_stack: Any, s3_store: S3Store, unique_prefix: str
) -> None:
    """Claims are made a page at a time as the window drains, not all at the start:
    each is a live manifest entry and a work item until its invoice finishes (issue 13
    #4: peak memory at 10,000 invoices within 1.1x of that at 1,000)."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.params import PARSE_THREADS, ProcessInvoicesParams
    from flows.tally import RunTally
    from flows.tasks import parse_and_extract

    keys = upload(s3_store, unique_prefix, 14)
    gate = asyncio.Event()

    class Gated(CountingExtractor):
        async def extract_document(self, text: str, **kwargs: Any) -> Extraction:
            extraction = await super().extract_document(text, **kwargs)
            await gate.wait()
            return extraction

    extractor = Gated()
    # One invoice per chunk; a window of PARSE_THREADS + 4 invoices read, not finished.
    params = ProcessInvoicesParams(invoices_per_task=1, max_llm_concurrency=1)
    window = params.invoices_in_flight(1)
    assert window == PARSE_THREADS + 4 < len(keys) - 4
    claimed: list[int] = []

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    async def run() -> RunTally:
        tally = RunTally()
        async with running_pipeline(s3_store, unique_prefix, extractor) as pipeline:

            async def pages() -> AsyncIterator[list[Any]]:
                async for page in pipeline.claim_pages(page_size=2, first_page_size=1):
                    claimed.append(len(page))
                    yield page

            async def release_once_the_window_is_full() -> None:
                deadline = asyncio.get_running_loop().time() + 30
                while sum(extractor.calls.values()) < window or sum(claimed) < window + 3:
                    assert asyncio.get_running_loop().time() < deadline, claimed
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)  # time enough to claim pages it should not
                claimed.append(0)  # the mark: what came before, the window held back
                gate.set()

            await asyncio.gather(
                parse_and_extract(pages(), pipeline, params, tally, claim_ahead=2),
                release_once_the_window_is_full(),
            )
        return tally

    tally = await run()
    held = sum(claimed[: claimed.index(0)])
    # The window's invoices, and pages until 2 or more wait behind it: 1+2+...+2.
    assert held == window + 3, claimed
    assert sum(claimed) == len(keys) and tally.statuses[Status.done] == len(keys)
    assert extractor.calls == {k: 1 for k in keys}


async def test_a_run_claiming_page_by_page_learns_how_many_the_listing_has_to_claim(
    s3_store: S3Store, unique_prefix: str
) -> None:
    """For its progress: the run claims a page at a time as its window drains, so what
    it claimed so far is not the run's total."""
    done = upload(s3_store, unique_prefix, 2)
    async with running_pipeline(s3_store, unique_prefix, CountingExtractor()) as pipeline:
        await run_all(pipeline)
    body, _ = s3_store.get(done[0])
    for i in range(5):
        s3_store.put(f"{unique_prefix}new-{i}.pdf", body, content_type="application/pdf")

    counts: list[int] = []
    extractor = CountingExtractor()
    async with running_pipeline(s3_store, unique_prefix, extractor, run_id="run-2") as pipeline:
        pages = pipeline.claim_pages(page_size=2, first_page_size=1, counted=counts.append)
        # The count starts as the run goes on past its first page, beside the listing.
        claimed = len(await anext(pages)) + len(await anext(pages))
        await wait_until(lambda: counts, timeout_s=10, interval_s=0.02)
        claimed += sum([len(page) async for page in pages])
    assert counts == [5]  # the two done ones are not to claim
    assert claimed == 5


async def test_a_run_claims_a_listing_page_at_a_time_each_in_one_commit(
    s3_store: S3Store, unique_prefix: str
) -> None:
    """The first invoices of a large prefix start while S3 lists the rest (issue 13 #3:
    the first LLM call within 1.5 s at 5,000 invoices). Each page is one claim commit."""
    keys = upload(s3_store, unique_prefix, 5)
    async with running_pipeline(s3_store, unique_prefix, CountingExtractor()) as pipeline:
        store = pipeline.committer.store
        pages, writes = [], []
        async for page in pipeline.claim_pages(page_size=3, first_page_size=1):
            pages.append(sorted(item.key for item in page))
            writes.append(store.writes)  # committed by the time the page is handed on
        # The first request asks for fewer keys: its invoices start soonest.
        assert pages == [sorted(keys)[:1], sorted(keys)[1:4], sorted(keys)[4:]]
        assert writes == [1, 2, 3]
    assert {k: e["status"] for k, e in entries(s3_store, unique_prefix).items()} == {
        k: "pending" for k in keys
    }
