"""The production lock: Prefect's global concurrency limit serializes writers across processes."""

from __future__ import annotations

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
