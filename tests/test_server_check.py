"""The flow's start-up lease check against the session's embedded server (one server,
filesystem leases): it reads the settings, does the round trip, and stays quiet. The
production tests show it warning about in-memory leases behind two replicas."""

from __future__ import annotations

import pytest

from flows.server_check import PROBE_LIMIT, PROBE_RENEWALS, warn_about_lease_storage
from invoiceflow import stack

pytestmark = pytest.mark.ops


async def test_one_server_with_filesystem_leases_passes_quietly(
    local_stack: stack.StackInfo,
) -> None:
    from prefect.client.orchestration import get_client

    check = await warn_about_lease_storage()

    assert check is not None
    assert check.lease_storage == "prefect.server.concurrency.lease_storage.filesystem"
    # Not a shared store, so the round trip ran: one server knows its own leases.
    assert check.renewals_lost == 0
    assert check.warning is None
    async with get_client() as client:
        probe = await client.read_global_concurrency_limit_by_name(PROBE_LIMIT)
    assert probe.active_slots == 0  # released on the server that granted it
    assert PROBE_RENEWALS >= 4
