"""Provider limits that hold across runs: Prefect global concurrency limits.

One extractor block = one provider account, so its limits are named after the block:

* ``invoiceflow-llm:<block>`` — a concurrency limit of ``max_in_flight`` slots;
* ``invoiceflow-llm:<block>:rpm`` / ``:tpm`` — rate limits (``slot_decay_per_second``
  = per-minute budget / 60) taken with Prefect's ``rate_limit``.

The block is the source of truth, so a run creates or updates these limits at start.

Slots: Prefect waiters poll (a refused acquire returns 423 and a Retry-After of up to
30 s, prefect/server/api/concurrency_limits_v2.py), so a slot freed by one run can sit
idle while the waiter of another sleeps. Four things keep slots busy instead:
`ProviderLimiter` takes slots in leases of as many as its calls wait for, hands a slot
a call frees to the next waiting call of its run, and gives a lease back only after
its slots sat idle for ``linger_s``; `prefect_slot` polls a refused acquire itself with
a short jittered backoff instead of sleeping Prefect's Retry-After.

Rate permits are taken in batches (`ProviderLimiter`'s reservoir) with
Prefect's own `rate_limit`, whose Retry-After for decaying limits is the time until the
refill.

`provider_limiter` is the run's one LLM gate: the run's cap (``max_llm_concurrency``)
and the block's limits in a single `ProviderLimiter`, so no call holds a slot of one
gate while it waits in another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.concurrency.asyncio import rate_limit
from prefect.exceptions import ObjectNotFound

from blocks.extractor import ExtractorBlock
from invoiceflow.extractors.limits import (
    ProviderLimiter,
    RateKind,
    RateTaker,
    SlotFactory,
    run_limiter,
)

log = logging.getLogger(__name__)

LEASE_DURATION_S = 300.0


@dataclass(frozen=True)
class ProviderLimitNames:
    in_flight: str
    requests: str
    tokens: str

    @classmethod
    def for_block(cls, block_name: str) -> ProviderLimitNames:
        base = f"invoiceflow-llm:{block_name}"
        return cls(base, f"{base}:rpm", f"{base}:tpm")


class ProviderLimitMissing(RuntimeError):
    """The provider's concurrency limit does not exist (or vanished mid-run)."""


def prefect_slot(
    name: str, *, poll_initial_s: float = 0.05, poll_max_s: float = 0.5
) -> SlotFactory:
    """`SlotFactory` holding up to ``wanted`` slots of the limit ``name`` under one lease.

    Talks to the lease API directly rather than through `prefect.concurrency`: that
    client funnels every acquisition of a limit through one queue (so concurrent
    acquisitions wait in line), sleeps Prefect's Retry-After on a 423 inside that
    queue, and logs each 423 as an error when told not to retry. An acquisition is all
    or nothing (prefect/server/api/concurrency_limits_v2.py), so a refused one asks
    again for as many as are free, or polls after a short jittered backoff when none
    is. The lease is renewed like Prefect does (every 3/4 of its duration) until the
    slots are released together.
    """

    @contextlib.asynccontextmanager
    async def slots(wanted: int) -> AsyncIterator[int]:
        async with get_client() as client:
            lease_id, granted = await _lease_slots(client, name, wanted, poll_initial_s, poll_max_s)
            renewal = asyncio.create_task(_renew(client, lease_id))
            try:
                yield granted
            finally:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal
                await client.release_concurrency_slots_with_lease(lease_id=lease_id)

    return slots


async def _lease_slots(
    client: PrefectClient, name: str, wanted: int, initial_s: float, max_s: float
) -> tuple[UUID, int]:
    """One lease on between 1 and ``wanted`` slots of ``name``: (lease id, slots)."""
    # A wait loop, not error retries: a 423 means "busy, ask again", and with many
    # waiters a retry library would log thousands of warnings for normal waiting.
    asking, delay, asked_for_free = max(1, wanted), initial_s, False
    while True:
        try:
            response = await client.increment_concurrency_slots_with_lease(
                names=[name], slots=asking, mode="concurrency", lease_duration=LEASE_DURATION_S
            )
        except httpx.HTTPStatusError as exc:
            # 423: not that many free; 422: more than the limit (lowered since the start).
            if exc.response.status_code not in (422, 423):
                raise
        else:
            lease = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            if not lease.limits:
                raise ProviderLimitMissing(f"concurrency limit {name!r} does not exist")
            return lease.lease_id, asking
        free = await _free_slots(client, name)
        if free >= 1 and not asked_for_free:
            asking, asked_for_free = min(asking, free), True  # ask again at once
            continue
        asking, asked_for_free = min(asking, max(free, 1)), False
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter spreads pollers
        delay = min(delay * 2, max_s)


async def _free_slots(client: PrefectClient, name: str) -> int:
    try:
        limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise ProviderLimitMissing(f"concurrency limit {name!r} does not exist") from None
    return max(0, limit.limit - limit.active_slots)


async def _renew(client: PrefectClient, lease_id: UUID) -> None:
    while True:
        await asyncio.sleep(LEASE_DURATION_S * 0.75)
        try:
            await client.renew_concurrency_lease(lease_id, lease_duration=LEASE_DURATION_S)
        except Exception as exc:  # the slot may be given to another run; say so loudly
            log.error("renewing provider slot lease %s failed: %s", lease_id, exc)


def prefect_rate(names: ProviderLimitNames) -> RateTaker:
    """`RateTaker` spending requests/tokens from the decaying Prefect rate limits."""

    async def take(kind: RateKind, amount: int) -> None:
        name = names.requests if kind == "requests" else names.tokens
        await rate_limit(name, occupy=max(1, amount), strict=True)

    return take


async def ensure_provider_limits(block: ExtractorBlock, names: ProviderLimitNames) -> None:
    """Create or update the global limits to match the block's configuration."""
    async with get_client() as client:
        wanted = [
            (names.in_flight, block.max_in_flight, None),
            (
                names.requests,
                block.requests_per_minute,
                block.requests_per_minute / 60 if block.requests_per_minute else None,
            ),
            (
                names.tokens,
                block.tokens_per_minute,
                block.tokens_per_minute / 60 if block.tokens_per_minute else None,
            ),
        ]
        for name, limit, decay in wanted:
            if not limit:
                continue
            await client.upsert_global_concurrency_limit_by_name(
                name, limit, slot_decay_per_second=decay
            )
            current = await client.read_global_concurrency_limit_by_name(name)
            if not current.active:
                # Prefect treats an inactive limit as always acquired.
                log.warning("provider limit %s is inactive: only this run's limits apply", name)


async def provider_limiter(
    block: ExtractorBlock, block_name: str, *, max_in_flight: int | None = None
) -> ProviderLimiter | None:
    """The run's one LLM gate for ``block`` (None for the offline rules extractor).

    ``max_in_flight`` is the run's own cap (``max_llm_concurrency``); the block's
    limits are also held across runs through Prefect global concurrency limits.
    """
    if block.kind == "rules":
        return None
    names = ProviderLimitNames.for_block(block_name)
    await ensure_provider_limits(block, names)
    shared_slot, shared_rate = prefect_slot(names.in_flight), prefect_rate(names)
    return run_limiter(
        block.provider_limits(),
        run_cap=max_in_flight,
        default_cap=block.max_connections,
        shared_slot=shared_slot,
        shared_rate=shared_rate,
    )
