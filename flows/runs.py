"""What Prefect says about the flow runs holding manifest claims.

The manifest's claim rules (`invoiceflow.manifest.Claim`, `reconcile`) take another
run's claim over only when its run has ended, and never while it is live; this is the
Prefect-backed answer they are given.
"""

from __future__ import annotations

import contextlib
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from invoiceflow.manifest import RunLiveness

PAGE = 200


async def flow_run_liveness(run_ids: set[str]) -> RunLiveness:
    """Which of these flow runs have ended (completed, failed, crashed, cancelled) and
    which are live (any other state). Ids Prefect does not know (another server, a
    deleted run, not a UUID) are in neither: the claim timeout decides for those.
    """
    ids = []
    for run_id in run_ids:
        with contextlib.suppress(ValueError):
            ids.append(uuid.UUID(run_id))
    runs = []
    async with get_client() as client:
        for start in range(0, len(ids), PAGE):  # the API caps one read at 200 runs
            page = ids[start : start + PAGE]
            runs += await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page)
            )
    known = [r for r in runs if r.state is not None]
    return RunLiveness(
        ended=frozenset(str(r.id) for r in known if r.state.is_final()),
        live=frozenset(str(r.id) for r in known if not r.state.is_final()),
    )
