"""The production lock: Prefect's global concurrency limit serializes writers across processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

from invoiceflow import stack
from invoiceflow.manifest import ManifestStore
from invoiceflow.storage import S3Store, make_s3_client

pytestmark = pytest.mark.e2e

WRITER = textwrap.dedent(
    """
    import asyncio, json, sys
    from flows.lock import manifest_lock
    from invoiceflow.manifest import Claim, ManifestStore
    from invoiceflow.storage import S3Store, make_s3_client

    endpoint, bucket, key, name, n = sys.argv[1:6]
    s3 = S3Store(make_s3_client(endpoint_url=endpoint, aws_access_key_id="x",
                                aws_secret_access_key="x"), bucket)
    store = ManifestStore(s3, key, lock=manifest_lock("invoiceflow-manifest"))

    async def main():
        await asyncio.gather(*(store.commit([Claim(f"{name}-{i}.pdf", "e", name)])
                               for i in range(int(n))))

    asyncio.run(main())
    print(json.dumps({"writes": store.writes, "conflicts": store.conflicts,
                      "slots": store.lock_acquisitions}))
    """
)


def test_prefect_slot_serializes_writers_in_separate_processes(
    local_stack: stack.StackInfo, unique_prefix: str
) -> None:
    key = f"manifests/{unique_prefix.rstrip('/')}-lock.json"
    per_process = 8
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                local_stack.s3_endpoint,
                local_stack.bucket,
                key,
                f"p{i}",
                str(per_process),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    s3 = S3Store(
        make_s3_client(
            endpoint_url=local_stack.s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x"
        ),
        local_stack.bucket,
    )
    snap = ManifestStore(s3, key, lock=lambda: None).read_sync()  # type: ignore[arg-type,return-value]
    assert len(snap.entries) == 2 * per_process  # nothing lost
    assert snap.revision == 2 * per_process
    # The slot alone kept writers apart: If-Match never had to step in.
    assert sum(r["conflicts"] for r in reports) == 0
    assert all(r["slots"] == r["writes"] == per_process for r in reports)


# -- a lock deleted or disabled mid-run ------------------------------------------------


def _s3(info: stack.StackInfo) -> S3Store:
    client = make_s3_client(
        endpoint_url=info.s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x"
    )
    return S3Store(client, info.bucket)


async def _lock_named(name: str) -> str:
    from flows.lock import ensure_manifest_lock

    await ensure_manifest_lock(name)
    return name


async def test_a_deleted_lock_stops_commits_with_the_command_that_restores_it(
    local_stack: stack.StackInfo, unique_prefix: str
) -> None:
    import time

    from prefect.client.orchestration import get_client

    from flows.lock import manifest_lock
    from invoiceflow.manifest import Claim, GroupCommitter, ManifestLockLost

    name = await _lock_named(f"lock-{unique_prefix.rstrip('/')}")
    store = ManifestStore(
        _s3(local_stack),
        f"manifests/{unique_prefix}deleted.json",
        lock=manifest_lock(name, wait_s=2),
    )
    committer = GroupCommitter(store, max_wait_s=0.05)
    await committer.__aenter__()
    assert (await committer.submit(Claim("a.pdf", "e", "run-1"))).applied
    async with get_client() as client:
        await client.delete_global_concurrency_limit_by_name(name)
    started = time.monotonic()
    with pytest.raises(ManifestLockLost) as lost:
        await committer.submit(Claim("b.pdf", "e", "run-1"))
    waited = time.monotonic() - started
    assert 1 <= waited < 10, waited  # retried with backoff, for a bounded time
    assert f"prefect gcl create {name} --limit 1" in str(lost.value)
    assert committer.lock_lost is lost.value  # producers can stop claiming
    started = time.monotonic()
    with pytest.raises(ManifestLockLost):  # later updates fail at once
        await committer.submit(Claim("c.pdf", "e", "run-1"))
    assert time.monotonic() - started < 1
    with pytest.raises(ManifestLockLost):  # close() re-raises it: the run fails
        await committer.close()
    assert set(store.read_sync().entries) == {"a.pdf"} and store.writes == 1


async def test_a_disabled_lock_is_never_taken_for_a_lock(
    local_stack: stack.StackInfo, unique_prefix: str
) -> None:
    """Prefect treats an inactive limit as acquired: no write may happen under it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from flows.lock import manifest_lock
    from invoiceflow.manifest import Claim, ManifestLockLost

    name = await _lock_named(f"lock-{unique_prefix.rstrip('/')}-off")
    store = ManifestStore(
        _s3(local_stack), f"manifests/{unique_prefix}off.json", lock=manifest_lock(name, wait_s=1)
    )
    async with get_client() as client:
        await client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(active=False)
        )
    with pytest.raises(ManifestLockLost, match=f"prefect gcl update {name} --enable"):
        await store.commit([Claim("a.pdf", "e", "run-1")])
    assert store.writes == 0


async def test_a_lock_restored_within_the_wait_lets_the_commit_through(
    local_stack: stack.StackInfo, unique_prefix: str
) -> None:
    from prefect.client.orchestration import get_client

    from flows.lock import manifest_lock
    from invoiceflow.manifest import Claim

    name = f"lock-{unique_prefix.rstrip('/')}-back"
    store = ManifestStore(
        _s3(local_stack), f"manifests/{unique_prefix}back.json", lock=manifest_lock(name, wait_s=60)
    )

    async def recreate_later() -> None:
        await asyncio.sleep(1.5)
        await _lock_named(name)

    [outcome], _ = await asyncio.gather(
        store.commit([Claim("a.pdf", "e", "run-1")]), recreate_later()
    )
    assert outcome.applied and store.writes == 1
    async with get_client() as client:
        assert (await client.read_global_concurrency_limit_by_name(name)).active_slots == 0


async def test_prefect_says_which_claim_holders_ended_and_which_are_live(
    local_stack: stack.StackInfo,
) -> None:
    import uuid

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed

    from flows.runs import flow_run_liveness

    @flow(name="liveness-probe")
    def probe() -> None: ...

    async with get_client() as client:
        scheduled, completed, crashed = [await client.create_flow_run(probe) for _ in range(3)]
        await client.set_flow_run_state(completed.id, Completed(), force=True)
        await client.set_flow_run_state(crashed.id, Crashed(), force=True)
    unknown = str(uuid.uuid4())
    runs = await flow_run_liveness(
        {str(scheduled.id), str(completed.id), str(crashed.id), unknown, "not-a-uuid"}
    )
    assert runs.live == {str(scheduled.id)}
    assert runs.ended == {str(completed.id), str(crashed.id)}
