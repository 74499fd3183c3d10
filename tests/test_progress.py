"""The run's progress artifact: throttled while invoices finish, exact at the end."""

from __future__ import annotations

import asyncio
import time

from flows.progress import claimed_all, estimate, expect, observe, tracking_progress
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoiceOutcome


class Recorder:
    """Stands in for the Prefect artifact API: records what would be published."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.published: list[tuple[float, str]] = []
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self, percent: float, description: str) -> None:
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("server unreachable")
        self.published.append((percent, description))


def outcome(i: int, status: Status = Status.done) -> InvoiceOutcome:
    return InvoiceOutcome(f"in/{i}.pdf", status, recorded=True)


async def test_updates_are_throttled_and_the_last_one_is_exact() -> None:
    recorder = Recorder()
    started = time.monotonic()
    async with tracking_progress(recorder, min_interval_s=0.2):
        expect(200)
        for i in range(200):
            observe(outcome(i, Status.failed if i % 50 == 0 else Status.done))
            await asyncio.sleep(0.005)  # invoices finishing over ~1 s
    elapsed = time.monotonic() - started

    # 200 outcomes, yet about one publication per interval (plus the first and last).
    assert len(recorder.published) <= elapsed / 0.2 + 3
    assert len(recorder.published) >= 3  # and it did move while the run was going
    assert recorder.published[0] == (0.0, "listing and claiming invoices")
    assert recorder.published[-1] == (100.0, "200 of 200 invoices finished, 4 failed")
    percents = [p for p, _ in recorder.published]
    assert percents == sorted(percents)


async def test_final_state_is_published_even_if_the_ticker_was_cut_off() -> None:
    recorder = Recorder(delay_s=0.3)  # a slow server: the ticker is mid-call at the end
    async with tracking_progress(recorder, min_interval_s=0.0):
        expect(3)
        await asyncio.sleep(0.35)
        for i in range(3):
            observe(outcome(i))
        await asyncio.sleep(0.05)  # the ticker has started publishing 3 of 3
    assert recorder.published[-1] == (100.0, "3 of 3 invoices finished")


async def test_a_failing_artifact_api_never_fails_the_run() -> None:
    async with tracking_progress(Recorder(fail=True), min_interval_s=0.0) as progress:
        expect(1)
        observe(outcome(0))
    assert progress.publications == 0
    assert progress.percent == 100.0


async def test_outcomes_outside_a_tracked_run_are_ignored() -> None:
    assert observe(outcome(0)).key == "in/0.pdf"
    expect(5)  # no run is being tracked: nothing to do, nothing raised


async def test_a_run_claiming_page_by_page_shows_the_listings_count_until_it_claimed_all() -> None:
    recorder = Recorder()
    async with tracking_progress(recorder, min_interval_s=0.0) as progress:
        expect(10)  # the first page, claimed; then the count of the whole listing
        estimate(40)
        for i in range(10):
            observe(outcome(i))
        await asyncio.sleep(0.01)
        assert recorder.published[-1] == (25.0, "10 of 40 invoices finished")
        expect(20)  # the next page: the percentage holds, it does not fall back
        await asyncio.sleep(0.01)
        assert recorder.published[-1] == (25.0, "10 of 40 invoices finished")
        claimed_all()  # another run took the rest: the total is what this run claimed
        for i in range(10, 30):
            observe(outcome(i))
    assert recorder.published[-1] == (100.0, "30 of 30 invoices finished")
    assert progress.total == 30
