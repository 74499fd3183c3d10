"""Provider limits that hold across runs: Prefect global concurrency limits.

One extractor block = one provider account, so its limits are named after the block:

* ``invoiceflow-llm:<block>`` — a concurrency limit of ``max_in_flight`` slots;
* ``invoiceflow-llm:<block>:rpm`` / ``:tpm`` — rate limits (``slot_decay_per_second``
  = per-minute budget / 60) taken with Prefect's ``rate_limit``.

The block is the source of truth, so a run creates or updates these limits at start.

Slots: Prefect waiters poll (a refused acquire returns 423 and a Retry-After of up to
30 s, FIELD_NOTES), so a slot freed by one run can sit idle while the waiter of
another sleeps. Two things keep slots busy instead: `ProviderLimiter` keeps a slot
it holds for the next call (released after ``linger_s`` idle), and `prefect_slot`
polls a refused acquire itself, with stamina's short jittered backoff, rather than
sleeping Prefect's Retry-After. Rate limits keep Prefect's own Retry-After pacing,
which for decaying slots is exactly the time until the budget refills.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import stamina
from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import concurrency, rate_limit
from prefect.exceptions import ConcurrencySlotAcquisitionError

from blocks.extractor import ExtractorBlock
from invoiceflow.extractors.limits import ProviderLimiter, RateKind, RateTaker, SlotFactory

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


def _refused(exc: Exception) -> bool:
    """A 423 "all slots taken" — worth polling again; anything else is not."""
    cause = exc.__cause__
    return (
        isinstance(exc, ConcurrencySlotAcquisitionError)
        and isinstance(cause, httpx.HTTPStatusError)
        and cause.response.status_code == 423
    )


def prefect_slot(
    name: str, *, poll_initial_s: float = 0.05, poll_max_s: float = 0.5
) -> SlotFactory:
    """`SlotFactory` holding one slot of the concurrency limit ``name`` while entered."""

    @contextlib.asynccontextmanager
    async def slot() -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            async for attempt in stamina.retry_context(
                on=_refused,
                attempts=None,
                timeout=None,
                wait_initial=poll_initial_s,
                wait_max=poll_max_s,
                wait_jitter=poll_initial_s,
            ):
                with attempt:
                    await stack.enter_async_context(
                        concurrency(
                            name,
                            occupy=1,
                            max_retries=0,
                            strict=True,
                            lease_duration=LEASE_DURATION_S,
                        )
                    )
            yield

    return slot


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
    """The run's limiter for ``block``: in-process limits plus the shared Prefect ones."""
    if block.kind == "rules":
        return None
    names = ProviderLimitNames.for_block(block_name)
    await ensure_provider_limits(block, names)
    return block.limiter(
        max_in_flight=max_in_flight,
        shared_slot=prefect_slot(names.in_flight),
        shared_rate=prefect_rate(names),
    )
