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
its slots sat idle for ``linger_s``; `prefect_slots` polls a refused acquire itself with
a short jittered backoff instead of sleeping Prefect's Retry-After (`flows/leases.py`).

Rate permits are taken in batches (`ProviderLimiter`'s reservoir) with
Prefect's own `rate_limit`, whose Retry-After for decaying limits is the time until the
refill.

`provider_limiter` is the run's one LLM gate: the run's cap (``max_llm_concurrency``)
and the block's limits in a single `ProviderLimiter`, so no call holds a slot of one
gate while it waits in another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import rate_limit

from blocks.extractor import ExtractorBlock
from flows.leases import prefect_slots
from invoiceflow.extractors.limits import (
    ProviderLimiter,
    RateKind,
    RateTaker,
    run_limiter,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProviderLimitNames:
    in_flight: str
    requests: str
    tokens: str

    @classmethod
    def for_block(cls, block_name: str) -> ProviderLimitNames:
        base = f"invoiceflow-llm:{block_name}"
        return cls(base, f"{base}:rpm", f"{base}:tpm")


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
    shared_slot, shared_rate = prefect_slots(names.in_flight), prefect_rate(names)
    return run_limiter(
        block.provider_limits(),
        run_cap=max_in_flight,
        default_cap=block.max_connections,
        shared_slot=shared_slot,
        shared_rate=shared_rate,
    )
