"""The manifest lock: a Prefect global concurrency limit of size one, taken strictly.

Prefect runs the body with no lock at all when the limit is inactive (any `strict`: the
server increments only active limits and still answers with the limit, see
`prefect/server/api/concurrency_limits_v2.py`, `_acquire_concurrency_slots`), and raises
a bare `ConcurrencySlotAcquisitionError` when it is missing (`strict=True`, see
`prefect/concurrency/_asyncio.py`, `aacquire_concurrency_slots_with_lease`).
`manifest_lock` takes its slot through the lease API (`flows/leases.py`: Prefect's
`concurrency()` queues acquisitions on a thread it shares with log and event shipping,
and an uncontended slot took 2-6 s to come back at saturation) and turns a missing or
inactive limit into a wait: it retries with backoff, and after a bounded time raises
`ManifestLockLost` naming the command that restores it, so no run ever crashes on
Prefect's raw error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectNotFound

from flows.leases import prefect_slots
from invoiceflow import defaults
from invoiceflow.manifest import ManifestLockLost

log = logging.getLogger(__name__)

DEFAULT_LOCK = defaults.MANIFEST_LOCK
# The server rejects leases shorter than 60 s; a commit takes well under a second, and
# the conditional write catches the rare writer that outlives its lease anyway.
LEASE_SECONDS = 60
# How long a commit keeps retrying a missing or inactive limit before the run gives up
# on the manifest (an operator recreating a deleted limit has this long).
LOCK_WAIT_SECONDS = 120.0


class ManifestLockError(RuntimeError):
    """The manifest's concurrency limit is missing, inactive or not of size one."""


async def check_manifest_lock(name: str) -> None:
    """Fail loudly unless `name` exists, is active and has limit 1.

    Prefect silently runs the body with no lock when a limit is missing (strict=False)
    or inactive (any strict), so this check runs before any invoice is touched.
    """
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise ManifestLockError(
                f"global concurrency limit {name!r} does not exist, so manifest writes would "
                f"not be serialized; create it with: prefect gcl create {name} --limit 1"
            ) from None
    if not limit.active:
        raise ManifestLockError(
            f"global concurrency limit {name!r} is inactive, which Prefect treats as no lock; "
            f"enable it with: prefect gcl update {name} --enable"
        )
    if limit.limit != 1:
        raise ManifestLockError(
            f"global concurrency limit {name!r} has limit {limit.limit}, but the manifest "
            f"needs exactly one writer; fix it with: prefect gcl update {name} --limit 1"
        )


async def ensure_manifest_lock(name: str) -> None:
    """Create the limit with size one, or repair it (used by `invoiceflow up`/deploy)."""
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )
            return
        if not limit.active or limit.limit != 1:
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
            )


def manifest_lock(
    name: str, *, wait_s: float = LOCK_WAIT_SECONDS
) -> Callable[[], contextlib.AbstractAsyncContextManager[Any]]:
    """The lock factory `ManifestStore` takes: one strict slot of `name` per commit.

    A slot that cannot be taken because the limit is missing or inactive is retried
    with backoff for up to `wait_s`, then `ManifestLockLost` is raised.
    """
    return _ManifestLock(name, wait_s).hold


# Checking that the limit is still active costs an API read (~40-100 ms here, loaded);
# at most this often. A limit disabled in between leaves the writes of this window
# without the slot, but never unguarded: every manifest write is also If-Match.
VERIFY_EVERY_S = 5.0


class _ManifestLock:
    def __init__(self, name: str, wait_s: float) -> None:
        self.name = name
        self.wait_s = wait_s
        self._slots = prefect_slots(name, lease_duration_s=LEASE_SECONDS)
        self._verified_at: float | None = None

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        slot = await self._take()
        try:
            yield
        finally:
            # The release must not turn a durable commit into a failure: a limit deleted
            # while held cannot be released, and its lease expires on its own.
            try:
                await slot.__aexit__(None, None, None)
            except Exception as exc:
                log.warning("releasing the manifest slot of %r failed: %s", self.name, exc)

    async def _take(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """An entered strict slot of the active limit, waiting up to `wait_s` for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        delay = 0.2
        while True:
            slot = self._slots(1)
            try:
                await slot.__aenter__()
            except Exception as exc:  # LimitMissing, or the API
                problem = f"{type(exc).__name__}: {exc}"
                self._verified_at = None
            else:
                problem = await self._problem(loop.time())
                if problem is None:
                    return slot
                await slot.__aexit__(None, None, None)  # an inactive limit held nothing
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ManifestLockLost(_lost_message(self.name, self.wait_s, problem))
            pause = min(delay * random.uniform(0.5, 1.0), remaining)  # jittered: runs differ
            log.warning(
                "manifest lock %r unavailable (%s); retrying in %.1fs", self.name, problem, pause
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, 10.0)

    async def _problem(self, now: float) -> str | None:
        if self._verified_at is not None and now - self._verified_at < VERIFY_EVERY_S:
            return None
        problem = await _lock_problem(self.name)
        self._verified_at = None if problem else now
        return problem


async def _lock_problem(name: str) -> str | None:
    """Why holding a slot of `name` does not serialize writers, or None if it does."""
    try:
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return "the limit was deleted"
    if not limit.active:
        return "the limit is inactive, which Prefect treats as no lock"
    return None


def _lost_message(name: str, wait_s: float, problem: str) -> str:
    return (
        f"could not take the manifest lock {name!r} for {wait_s:.0f}s ({problem}); "
        f"no further manifest writes. Restore it with: prefect gcl create {name} --limit 1 "
        f"(if it was deleted) or: prefect gcl update {name} --enable (if it was disabled); "
        "then run the flow again."
    )
