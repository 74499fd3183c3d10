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
