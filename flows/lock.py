"""The manifest lock: a Prefect global concurrency limit of size one, taken strictly."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.asyncio import concurrency
from prefect.exceptions import ObjectNotFound

DEFAULT_LOCK = "invoiceflow-manifest"
# The server rejects leases shorter than 60 s; a commit takes well under a second, and
# the conditional write catches the rare writer that outlives its lease anyway.
LEASE_SECONDS = 60


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


def manifest_lock(name: str) -> Callable[[], contextlib.AbstractAsyncContextManager[Any]]:
    """The lock factory `ManifestStore` takes: one strict slot of `name` per commit."""

    def acquire() -> contextlib.AbstractAsyncContextManager[Any]:
        return concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS)

    return acquire
