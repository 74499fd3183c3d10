"""Start-up check: does the Prefect server keep concurrency leases across API replicas?

Prefect keeps concurrency leases in the memory of the API process that granted them
unless `PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE` names a shared store
(`prefect_redis.lease_storage`; upstream `prefect/server/concurrency/lease_storage/`).
Behind a load balancer with several replicas, a renewal that reaches another replica
gets 410 Gone: runs crash with "Concurrency lease renewal failed", the manifest lock
is handed out while held, and deployment concurrency slots leak for good.

`warn_about_lease_storage()` runs when the flow opens its pipeline. It reads the
server's settings where the API exposes them (`GET /admin/settings`); where it can't,
or the storage is per-process, it takes a lease on a probe limit and renews it several
times, each renewal a separate request the balancer may send to another replica. A
lost lease means per-replica leases: it warns loudly in the run log. It never refuses
to run (the manifest's If-Match writes still keep the manifest itself safe) and never
raises.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger
from prefect.logging.loggers import get_logger

PROBE_LIMIT = "invoiceflow-lease-probe"
# A release sent to a replica that does not hold the lease frees nothing: decay lets
# such probe slots run out instead of filling the probe limit over many runs.
PROBE_SIZE = 10_000
PROBE_DECAY_PER_SECOND = 0.1
PROBE_RENEWALS = 6  # 2 replicas, round robin: all six on the granting one is ~1.6 %
LEASE_SECONDS = 60  # the server's minimum
SHARED_LEASE_STORAGE = ("prefect_redis.lease_storage",)


@dataclass(frozen=True)
class LeaseCheck:
    """What the check found. `lease_storage` is None when the API does not say."""

    lease_storage: str | None
    messaging_broker: str | None
    renewals_lost: int | None  # None: no round trip was needed or possible
    warning: str | None


async def _server_settings(client: PrefectClient) -> dict[str, Any] | None:
    """`GET /admin/settings`, or None where the API does not expose it (Cloud, a proxy)."""
    try:
        response = await client._client.get("/admin/settings")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return dict(response.json())


async def _ensure_probe_limit(client: PrefectClient) -> None:
    try:
        await client.read_global_concurrency_limit_by_name(PROBE_LIMIT)
    except ObjectNotFound:
        # Another run may create it at the same moment.
        with contextlib.suppress(ObjectAlreadyExists):
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name=PROBE_LIMIT,
                    limit=PROBE_SIZE,
                    slot_decay_per_second=PROBE_DECAY_PER_SECOND,
                )
            )


async def lease_round_trip(client: PrefectClient, renewals: int = PROBE_RENEWALS) -> int:
    """Take a probe lease, renew it `renewals` times, release it. Returns how many
    renewals answered 410 Gone (the replica they reached did not know the lease)."""
    await _ensure_probe_limit(client)
    response = await client.increment_concurrency_slots_with_lease(
        names=[PROBE_LIMIT], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS
    )
    lease_id = UUID(response.json()["lease_id"])
    lost = 0
    for _ in range(renewals):
        try:
            await client.renew_concurrency_lease(lease_id, lease_duration=LEASE_SECONDS)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 410:
                raise
            lost += 1
    # A replica that never saw the lease may refuse; the probe limit's decay frees it.
    with contextlib.suppress(httpx.HTTPStatusError):
        await client.release_concurrency_slots_with_lease(lease_id)
    return lost


def _setting(settings: dict[str, Any] | None, *path: str) -> str | None:
    node: Any = settings
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node if isinstance(node, str) else None


def _warning(check: LeaseCheck) -> str | None:
    if not check.renewals_lost:
        return None
    return (
        f"PREFECT SERVER MISCONFIGURED FOR SEVERAL API REPLICAS: {check.renewals_lost} of "
        f"{PROBE_RENEWALS} lease renewals reached a replica that did not know the lease "
        f"(lease storage: {check.lease_storage or 'not exposed by the API'}, messaging: "
        f"{check.messaging_broker or 'unknown'}). Concurrency leases live in each API "
        "process's memory, so runs may crash on lease renewal, the manifest lock may be "
        "handed out while held (the manifest's conditional writes still keep it "
        "consistent, at the cost of retries) and deployment concurrency slots may leak. "
        "Set PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage (and "
        "PREFECT_MESSAGING_BROKER/CACHE=prefect_redis.messaging) on every replica; see "
        "README 'Production deployment'. This run continues."
    )


async def check_lease_storage(client: PrefectClient) -> LeaseCheck:
    settings = await _server_settings(client)
    storage = _setting(settings, "server", "concurrency", "lease_storage")
    broker = _setting(settings, "server", "events", "messaging_broker")
    lost = None
    if storage not in SHARED_LEASE_STORAGE:
        lost = await lease_round_trip(client)
    found = LeaseCheck(storage, broker, lost, None)
    return LeaseCheck(storage, broker, lost, _warning(found))


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except Exception:  # outside a run (tests, scripts): Prefect's own logger
        return get_logger("invoiceflow.server_check")


async def warn_about_lease_storage() -> LeaseCheck | None:
    """The flow's start-up check: warn loudly in the run log, never refuse, never raise."""
    logger = _logger()
    try:
        async with get_client() as client:
            check = await check_lease_storage(client)
    except Exception as exc:  # a check must not be the reason a run fails
        logger.warning("Could not check the server's lease storage: %s", exc)
        return None
    if check.warning:
        logger.warning(check.warning)
    else:
        logger.debug("lease storage %s, renewals lost %s", check.lease_storage, check.renewals_lost)
    return check
