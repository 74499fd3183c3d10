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

Lease requests go through `lease_client`: Prefect's client, except that a 503 is asked
again within a fraction of a second. Prefect on SQLite answers 503 when a lease's
read-then-update transaction meets another writer ("database is locked": SQLite refuses
to upgrade a deferred read transaction at once, without waiting out busy_timeout), and
its client then sleeps 2**attempt s before the retry (prefect/client/base.py,
`_send_with_retry`). Measured on the embedded stack: 3 to 6 of these in a 1,000-invoice
run, each holding up a manifest commit or the run's first LLM call by ~2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator
from uuid import UUID

import certifi
import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

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
        async with lease_client() as client:
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


class AskAgainWhenBusy(httpx.AsyncBaseTransport):
    """A transport that asks again, after 20-250 ms, when the server answers 503.

    Only after ~1 s of 503s does the last one reach Prefect's client, which then retries
    with its own backoff as before. A 503 is what Prefect's server sends for errors it
    calls retryable (prefect/server/api/server.py, `custom_internal_exception_handler`):
    the request's transaction was rolled back, so asking again is what the client would
    do anyway, only later.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, *, within_s: float = 1.0) -> None:
        self._inner = inner
        self._within_s = within_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # A plain loop, not stamina: its retry hook logs every retry as a warning, and
        # on SQLite these 503s are routine under load.
        deadline, delay = time.monotonic() + self._within_s, 0.02
        while True:
            response = await self._inner.handle_async_request(request)
            if response.status_code != 503 or time.monotonic() + delay > deadline:
                return response
            await response.aclose()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.25)

    async def aclose(self) -> None:
        await self._inner.aclose()


@contextlib.asynccontextmanager
async def lease_client() -> AsyncIterator[PrefectClient]:
    """A Prefect client for lease requests whose 503s are asked again at once.

    Its own connection (about 1 ms to set up) and the TLS settings Prefect's client uses.
    """
    tls = _tls_context(
        PREFECT_API_SSL_CERT_FILE.value(), PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()
    )
    transport = AskAgainWhenBusy(httpx.AsyncHTTPTransport(verify=tls, retries=3))
    async with get_client(httpx_settings={"transport": transport, "verify": tls}) as client:
        yield client


@functools.cache
def _tls_context(cert_file: str | None, insecure: bool) -> ssl.SSLContext:
    """What PrefectClient builds (prefect/client/orchestration/__init__.py), built once:
    an SSL context costs ~20 ms of CPU."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cert_file or certifi.where())
