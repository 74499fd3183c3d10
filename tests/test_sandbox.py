"""DocumentWorkers: OS-enforced time and memory budgets for untrusted document work.

Reproduces issue 11's budget breaks (an attachment bomb that drove a run to 2.4 GB, a
PDF whose text extraction takes minutes, an allocation bomb) against real worker
processes, and checks that the pool survives each of them.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import threading
import time

import pytest
import sandbox_support as hostile

from invoiceflow.documents import DocumentError, DocumentLimits
from invoiceflow.sandbox import DocumentWorkers

MB = 1024 * 1024


def _worker_pids(workers: DocumentWorkers) -> set[int]:
    """Pids of the pool's idle workers (test-only peek)."""
    return {w.process.pid for w in list(workers._idle.queue) if w is not None}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_job_over_the_time_limit_is_killed_and_the_next_job_works() -> None:
    with DocumentWorkers(1, DocumentLimits(time_limit_s=2)) as workers:
        assert workers.call(hostile.sleep_then, 0, "warm") == "warm"
        (first_pid,) = _worker_pids(workers)
        started = time.monotonic()
        with pytest.raises(DocumentError) as caught:
            workers.call(hostile.sleep_then, 60, "never")
        elapsed = time.monotonic() - started
        assert caught.value.kind == "too_slow"
        assert caught.value.transient is False
        assert "2 s time limit" in str(caught.value)
        assert 2 <= elapsed < 6
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)  # the worker is gone (killed and reaped)
        assert workers.call(hostile.sleep_then, 0, "next") == "next"
        assert _worker_pids(workers) not in ({first_pid}, set())


def test_allocation_bomb_fails_too_large_under_rlimit_as() -> None:
    with DocumentWorkers(1, DocumentLimits(memory_limit_mb=512)) as workers:
        before = _peak_rss_mb()
        with pytest.raises(DocumentError) as caught:
            workers.call(hostile.allocate_mb, 4096)
        assert caught.value.kind == "too_large"
        assert "512 MB memory limit" in str(caught.value)
        assert _peak_rss_mb() - before < 100  # the bomb never touched this process
        assert workers.call(hostile.allocate_mb, 64) == 64  # a replacement worker


def test_attachment_bomb_stays_under_the_memory_limit() -> None:
    """Issue 11: a 17 KB PDF whose 30 attachments each inflate to 74 MB (2.2 GB decoded)."""
    bomb = hostile.attachment_bomb()
    assert len(bomb) < 20_000
    with DocumentWorkers(1, DocumentLimits(memory_limit_mb=1024)) as workers:
        before = _peak_rss_mb()
        # pypdf's own decoding, unbounded: only the worker's RLIMIT_AS stops it.
        with pytest.raises(DocumentError) as caught:
            workers.call(hostile.attachment_sizes, bomb)
        assert caught.value.kind == "too_large"
        assert "1024 MB memory limit" in str(caught.value)
        # Reading it as an invoice: the e-invoice reader decodes attachments. Until it
        # checks sizes before decoding, the worker hits its limit (too_large); once it
        # does, the bomb is skipped and the blank page fails OCR. Never a 2 GB process.
        with pytest.raises(DocumentError) as caught:
            workers.read(bomb, "bomb.pdf")
        assert caught.value.kind in ("too_large", "ocr_failed")
        assert caught.value.transient is False
        assert _peak_rss_mb() - before < 100


def test_superlinear_text_extraction_is_killed_at_the_time_limit() -> None:
    """pypdf's extract_text is superlinear in text operators; the wall clock stops it."""
    slow_pdf = hostile.text_operator_bomb(600_000)
    assert len(slow_pdf) < 20_000
    limits = DocumentLimits(time_limit_s=2, max_text_operators=10**9)  # no pre-check
    with DocumentWorkers(1, limits) as workers:
        started = time.monotonic()
        with pytest.raises(DocumentError) as caught:
            workers.read(slow_pdf, "slow.pdf")
        assert caught.value.kind == "too_slow"
        assert time.monotonic() - started < 6


def test_text_operator_precheck_refuses_before_extracting() -> None:
    slow_pdf = hostile.text_operator_bomb(600_000)
    with DocumentWorkers(1, DocumentLimits(time_limit_s=30)) as workers:
        started = time.monotonic()
        with pytest.raises(DocumentError) as caught:
            workers.read(slow_pdf, "slow.pdf")
        assert caught.value.kind == "too_large"
        assert "text operators" in str(caught.value)
        assert time.monotonic() - started < 10


def test_worker_killed_by_the_kernel_fails_too_large() -> None:
    """A SIGKILL the pool did not send is the OOM killer's."""
    with DocumentWorkers(1) as workers:
        with pytest.raises(DocumentError) as caught:
            workers.call(os.kill, 0, signal.SIGKILL)  # pid 0: the worker's own group
        assert caught.value.kind == "too_large"
        assert "killed by the kernel" in str(caught.value)
        assert workers.call(hostile.sleep_then, 0, "after") == "after"


def test_exceptions_cross_the_pipe_and_the_worker_is_reused() -> None:
    with DocumentWorkers(1) as workers:
        workers.call(hostile.sleep_then, 0, "warm")
        pids = _worker_pids(workers)
        with pytest.raises(ValueError, match="boom"):
            workers.call(hostile.fail_with, "boom")
        assert _worker_pids(workers) == pids


def test_blocking_calls_from_several_threads_are_bounded_by_the_pool() -> None:
    with DocumentWorkers(2, DocumentLimits(time_limit_s=20)) as workers:
        for _ in range(2):  # start both workers
            workers.call(hostile.sleep_then, 0, "warm")
        results: dict[int, str] = {}

        def one(index: int) -> None:
            results[index] = workers.call(hostile.sleep_then, 0.5, str(index))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        assert results == {i: str(i) for i in range(4)}
        assert elapsed >= 1.0  # 4 jobs of 0.5 s on 2 workers: two rounds


async def test_async_calls_do_not_block_the_event_loop() -> None:
    with DocumentWorkers(2, DocumentLimits(time_limit_s=20)) as workers:
        await workers.acall(hostile.sleep_then, 0, "warm")
        ticks = 0
        stop = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        results = await asyncio.gather(
            *(workers.acall(hostile.sleep_then, 1.0, str(i)) for i in range(4))
        )
        elapsed = time.monotonic() - started
        stop.set()
        await ticker
        assert results == ["0", "1", "2", "3"]
        # ~2 s of jobs; a blocked loop would tick once or not at all.
        assert ticks >= elapsed / 0.05 * 0.5


async def test_date_label_bomb_through_the_rules_path_keeps_other_invoices_moving() -> None:
    """Issue 11: `"Date: " * 8000` took 31 s on the event loop and stalled every LLM call."""
    from invoiceflow.extractors import ExtractionError
    from invoiceflow.extractors.rules import RulesExtractor
    from invoiceflow.pdf import parse_pdf
    from invoiceflow.samples import generate_invoice

    budget = 5.0
    with DocumentWorkers(2, DocumentLimits(time_limit_s=budget)) as workers:
        extractor = RulesExtractor(runner=workers)
        await extractor.extract("warm up")
        pdf, truth = generate_invoice(3)
        good_text = parse_pdf(pdf).text
        gaps: list[float] = []
        stop = asyncio.Event()

        async def tick() -> None:  # stands in for the run's LLM calls
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.02)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async def bomb() -> str:
            try:
                await extractor.extract_document("Date: " * 8000)
                return "finished"
            except ExtractionError as exc:
                assert exc.transient is False
                return exc.kind

        async def good() -> tuple[float, object]:
            await asyncio.sleep(0.2)  # the bomb holds its worker by now
            started = time.monotonic()
            extraction = await extractor.extract_document(good_text)
            return time.monotonic() - started, extraction.invoice

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        outcome, (good_took, good_invoice) = await asyncio.gather(bomb(), good())
        elapsed = time.monotonic() - started
        stop.set()
        await ticker

    assert outcome in ("finished", "too_slow")
    assert elapsed < budget + 3
    assert good_invoice.invoice_number == truth.invoice_number  # type: ignore[attr-defined]
    assert good_invoice.total == truth.total  # type: ignore[attr-defined]
    assert good_took < 3  # not queued behind the bomb
    assert max(gaps) < 1.0  # the loop never stalled


def test_a_job_the_worker_cannot_load_fails_and_the_worker_survives() -> None:
    with DocumentWorkers(1) as workers:
        workers.call(hostile.sleep_then, 0, "warm")
        pids = _worker_pids(workers)
        with pytest.raises(DocumentError) as caught:
            workers.call(hostile.job_from_nowhere(), 1)
        assert caught.value.kind == "internal_error"
        assert "cannot load the job" in str(caught.value)
        assert _worker_pids(workers) == pids


def test_close_wakes_callers_waiting_for_a_worker() -> None:
    workers = DocumentWorkers(1, DocumentLimits(time_limit_s=20))
    outcomes: list[str] = []

    def busy() -> None:
        outcomes.append(workers.call(hostile.sleep_then, 1.0, "busy"))

    def waiting() -> None:
        try:
            workers.call(hostile.sleep_then, 0, "never")
            outcomes.append("ran")
        except RuntimeError:
            outcomes.append("closed")

    first = threading.Thread(target=busy)
    first.start()
    time.sleep(0.5)  # the only worker is busy now
    second = threading.Thread(target=waiting)
    second.start()
    time.sleep(0.2)
    workers.close()
    first.join(timeout=10)
    second.join(timeout=10)
    assert not second.is_alive()
    assert sorted(outcomes) == ["busy", "closed"]


async def test_the_flows_rules_extractor_runs_in_a_worker_process_not_the_caller() -> None:
    """What the flow builds from a rules block: `extract_invoice` in a document worker
    (under its budgets), never on the flow's event loop; and no page images."""
    from blocks.extractor import ExtractorBlock

    block = ExtractorBlock(kind="rules")
    assert block.vision_limits() == {"vision": "never"}
    seen: list[int] = []
    with DocumentWorkers(1, DocumentLimits()) as workers:
        original = workers.acall

        async def spy(fn, *args):  # type: ignore[no-untyped-def]
            seen.append(os.getpid())
            return await original(fn, *args)

        workers.acall = spy  # type: ignore[method-assign]
        extractor = block.build(runner=workers)
        extraction = await extractor.extract_document("Invoice No.: A-1\nTotal: 10.00 EUR")
    assert seen, "the rules extractor did not go through the worker pool"
    assert extraction.invoice.invoice_number == "A-1"
