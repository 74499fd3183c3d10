"""Slots of Prefect global concurrency limits, taken through the lease API directly.

Both of a run's gates use it: the manifest lock (`flows/lock.py`, one slot) and the
provider's in-flight limit (`flows/llm_limits.py`, many slots per lease).

Not through `prefect.concurrency`: that client sends every acquisition through a queue
service on Prefect's global event-loop thread, which it shares with log and event
shipping, so at thousands of invoices a minute an uncontended manifest slot took 2-6 s
to come back; it also funnels a limit's acquisitions through one queue, sleeps the
server's Retry-After on a 423 (up to 30 s, prefect/server/api/concurrency_limits_v2.py)
and logs each 423 as an error when told not to retry. Here the acquire is one request
on the caller's loop; a refused one asks again for as many slots as are free, or polls
after a short jittered backoff when none is. The lease is renewed like Prefect does
(every 3/4 of its duration) until the slots are released together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.exceptions import ObjectNotFound

from invoiceflow.extractors.limits import SlotFactory

log = logging.getLogger(__name__)

LEASE_DURATION_S = 300.0


class LimitMissing(RuntimeError):
    """The concurrency limit does not exist (or vanished mid-run)."""


def prefect_slots(
    name: str,
    *,
    lease_duration_s: float = LEASE_DURATION_S,
    poll_initial_s: float = 0.05,
    poll_max_s: float = 0.5,
) -> SlotFactory:
    """Hold up to ``wanted`` slots of the limit ``name`` under one lease while entered.

    Prefect answers an acquisition of an inactive limit as granted without counting it:
    callers that need a real lock check that the limit is active (`flows/lock.py`).
    """

    @contextlib.asynccontextmanager
    async def slots(wanted: int) -> AsyncIterator[int]:
        async with get_client() as client:
            lease_id, granted = await _lease(
                client, name, wanted, lease_duration_s, poll_initial_s, poll_max_s
            )
            renewal = asyncio.create_task(_renew(client, lease_id, lease_duration_s))
            try:
                yield granted
            finally:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal
                await client.release_concurrency_slots_with_lease(lease_id=lease_id)

    return slots


async def _lease(
    client: PrefectClient,
    name: str,
    wanted: int,
    duration_s: float,
    initial_s: float,
    max_s: float,
) -> tuple[UUID, int]:
    """One lease on between 1 and ``wanted`` slots of ``name``: (lease id, slots)."""
    # A wait loop, not error retries: a 423 means "busy, ask again", and with many
    # waiters a retry library would log thousands of warnings for normal waiting.
    asking, delay, asked_for_free = max(1, wanted), initial_s, False
    while True:
        try:
            response = await client.increment_concurrency_slots_with_lease(
                names=[name], slots=asking, mode="concurrency", lease_duration=duration_s
            )
        except httpx.HTTPStatusError as exc:
            # 423: not that many free; 422: more than the limit (lowered since the start).
            if exc.response.status_code not in (422, 423):
                raise
        else:
            lease = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            if not lease.limits:
                raise LimitMissing(f"concurrency limit {name!r} does not exist")
            return lease.lease_id, asking
        # All or nothing (an acquisition of more than are free is refused whole): ask
        # once for what is free, else wait for a slot to come back.
        free = await _free_slots(client, name) if asking > 1 else 0
        if free >= 1 and not asked_for_free:
            asking, asked_for_free = min(asking, free), True
            continue
        asking, asked_for_free = min(asking, max(free, 1)), False
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter spreads pollers
        delay = min(delay * 2, max_s)


async def _free_slots(client: PrefectClient, name: str) -> int:
    try:
        limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise LimitMissing(f"concurrency limit {name!r} does not exist") from None
    return max(0, limit.limit - limit.active_slots)


async def _renew(client: PrefectClient, lease_id: UUID, duration_s: float) -> None:
    while True:
        await asyncio.sleep(duration_s * 0.75)
        try:
            await client.renew_concurrency_lease(lease_id, lease_duration=duration_s)
        except Exception as exc:  # the slots may be given to another holder; say so loudly
            log.error("renewing the lease %s on concurrency slots failed: %s", lease_id, exc)
