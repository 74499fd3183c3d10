"""A progress artifact per run, moved forward as invoices finish, at most every few seconds.

The flow layer observes outcomes (`observe`) as the extract tasks complete them; the
domain package never hears of Prefect. Counting is synchronous and free; a background
ticker publishes the count when it changed, so a run of 10,000 invoices makes a few
hundred artifact updates at most, not 10,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from uuid import UUID

from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoiceOutcome

log = logging.getLogger(__name__)

PROGRESS_ARTIFACT_KEY = "invoiceflow-progress"
# One artifact update costs an API round trip and a row write on the server; every two
# seconds is live enough for a person watching the run page.
PUBLISH_INTERVAL_S = 2.0

Publish = Callable[[float, str], Awaitable[None]]


class RunProgress:
    """How many of the run's claimed invoices have finished, published throttled."""

    def __init__(self, publish: Publish, *, min_interval_s: float = PUBLISH_INTERVAL_S) -> None:
        self._publish = publish
        self.min_interval_s = min_interval_s
        self.claimed: int | None = None
        # While the listing goes on: what it counted to claim in all (`estimate`).
        self.estimated: int | None = None
        self.finished = 0
        self.failed = 0
        self.publications = 0
        self._published: tuple[int | None, int] | None = None
        self._last_publish = float("-inf")
        self._changed = asyncio.Event()

    def expect(self, count: int) -> None:
        """The run claimed `count` more invoices (it claims them a listing page at a time)."""
        self.claimed = (self.claimed or 0) + count
        self._changed.set()

    def estimate(self, total: int) -> None:
        """A count of the whole listing: `total` to claim in all, as far as it knew."""
        self.estimated = total
        self._changed.set()

    def claimed_all(self) -> None:
        """The listing is claimed to its end: the total is what was claimed."""
        self.estimated = None
        self._changed.set()

    @property
    def total(self) -> int | None:
        """The invoices claimed, or, while the run claims a page at a time, counted to
        claim in all: the percentage does not fall back as each page is claimed."""
        if self.estimated is None or self.claimed is None:
            return self.claimed
        return max(self.claimed, self.estimated)

    def observe(self, outcome: InvoiceOutcome) -> None:
        self.finished += 1
        if outcome.status is Status.failed:
            self.failed += 1
        self._changed.set()

    @property
    def percent(self) -> float:
        if self.total is None:
            return 0.0
        if self.total == 0:
            return 100.0
        return min(100.0, 100.0 * self.finished / self.total)

    def describe(self) -> str:
        if self.total is None:
            return "listing and claiming invoices"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.finished} of {self.total} invoices finished{failed}"

    async def publish(self) -> None:
        """Publish now if anything changed since the last publication (best effort)."""
        state = (self.total, self.finished)
        if state == self._published:
            return
        self._last_publish = time.monotonic()
        try:
            await self._publish(self.percent, self.describe())
        except Exception as exc:  # progress is cosmetic: never fail a run over it
            log.warning("could not update the progress artifact: %s", exc)
            return
        # Only now: a publication cancelled halfway (the ticker at run end) must not
        # count, or the final publication would think there is nothing left to say.
        self._published = state
        self.publications += 1

    async def run_ticker(self) -> None:
        """Publish changes, at most once per `min_interval_s`, until cancelled."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            wait = self._last_publish + self.min_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.publish()


_current: ContextVar[RunProgress | None] = ContextVar("invoiceflow_run_progress", default=None)


def observe(outcome: InvoiceOutcome) -> InvoiceOutcome:
    """Count `outcome` towards the current run's progress (if one is being tracked)."""
    progress = _current.get()
    if progress is not None:
        progress.observe(outcome)
    return outcome


def expect(count: int) -> None:
    progress = _current.get()
    if progress is not None:
        progress.expect(count)


def estimate(total: int) -> None:
    progress = _current.get()
    if progress is not None:
        progress.estimate(total)


def claimed_all() -> None:
    progress = _current.get()
    if progress is not None:
        progress.claimed_all()


async def _artifact_publisher() -> Publish:
    from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
    from prefect.logging import get_run_logger

    artifact_id: UUID | None = None
    logged_decile = -1

    async def publish(percent: float, description: str) -> None:
        # The run log says how far the run is every 10% (invoices themselves are logged
        # only when they fail: a line per invoice cost the event loop and the server
        # more than the rest of the bookkeeping at thousands of invoices a minute).
        nonlocal artifact_id, logged_decile
        if (decile := int(percent // 10)) > logged_decile:
            logged_decile = decile
            get_run_logger().info("progress: %s", description)
        if artifact_id is None:
            artifact_id = await acreate_progress_artifact(
                percent, key=PROGRESS_ARTIFACT_KEY, description=description
            )
        else:
            await aupdate_progress_artifact(artifact_id, percent, description=description)

    return publish


@contextlib.asynccontextmanager
async def tracking_progress(
    publish: Publish | None = None, *, min_interval_s: float = PUBLISH_INTERVAL_S
) -> AsyncIterator[RunProgress]:
    """Track this run's progress in a Prefect progress artifact for the `with` block.

    Outcomes observed anywhere below (tasks awaited on this loop inherit the context)
    count; the final state is published on exit, even when the run fails.
    """
    progress = RunProgress(publish or await _artifact_publisher(), min_interval_s=min_interval_s)
    token = _current.set(progress)
    await progress.publish()
    ticker = asyncio.create_task(progress.run_ticker(), name="invoiceflow-progress")
    try:
        yield progress
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await progress.publish()
        with contextlib.suppress(ValueError):  # exited from another context: harmless
            _current.reset(token)
