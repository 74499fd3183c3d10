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

import asyncio
import logging
from dataclasses import dataclass

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.asyncio import rate_limit
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

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
    wanted = [
        (names.in_flight, block.max_in_flight, None),
        (names.requests, block.requests_per_minute, _per_second(block.requests_per_minute)),
        (names.tokens, block.tokens_per_minute, _per_second(block.tokens_per_minute)),
    ]
    async with get_client() as client:
        # Side by side, each one read, and a write only when it is missing or differs
        # (Prefect's `upsert_global_concurrency_limit_by_name` reads, then writes, and
        # the `active` flag takes another read): the run's first LLM call waits on this.
        await asyncio.gather(
            *(_ensure(client, name, limit, decay) for name, limit, decay in wanted if limit)
        )


async def _ensure(client: PrefectClient, name: str, limit: int, decay: float | None) -> None:
    try:
        current = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, **_decay(decay))
            )
            return
        except ObjectAlreadyExists:  # another run created it meanwhile: update that one
            current = await client.read_global_concurrency_limit_by_name(name)
    if current.limit != limit or (decay is not None and current.slot_decay_per_second != decay):
        update = GlobalConcurrencyLimitUpdate(limit=limit, **_decay(decay))
        await client.update_global_concurrency_limit(name, update)
    if not current.active:
        # Prefect treats an inactive limit as always acquired.
        log.warning("provider limit %s is inactive: only this run's limits apply", name)


def _decay(per_second: float | None) -> dict[str, float]:
    # Left unset for a concurrency limit, as Prefect's own upsert does.
    return {} if per_second is None else {"slot_decay_per_second": per_second}


def _per_second(per_minute: int | None) -> float | None:
    return per_minute / 60 if per_minute else None


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
