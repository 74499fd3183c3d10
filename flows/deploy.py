"""Prepare a Prefect server for `prefect.yaml` and deploy it; start a worker for it.

`prepare_server` creates what the deployments need and `prefect deploy` does not: the
process work pool, the manifest lock (a global concurrency limit of size one) and the
blocks. Everything is idempotent, so `make deploy` can run again after any change.
`deploy_all` then runs `prefect --no-prompt deploy --all` in the repository root, the
way a person would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

from flows.lock import DEFAULT_LOCK, ensure_manifest_lock
from flows.notify import DEFAULT_WEBHOOK_BLOCK
from flows.provision import AWS_BLOCK, BUCKET_BLOCK, S3_CLIENT_CONFIG, ensure_extractor_block

WORK_POOL = "invoices"
REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "prefect.yaml"


class DeployError(RuntimeError):
    """The server cannot take the deployments yet; the message says what to do."""


@dataclass
class Prepared:
    """What `prepare_server` found or created, for the CLI to report."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


async def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool `name` unless it exists. Returns True if created."""
    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="invoiceflow: flow runs as subprocesses of `make worker`.",
                )
            )
            return True
    if pool.type != ProcessWorker.type:
        raise DeployError(
            f"work pool {name!r} exists with type {pool.type!r}; prefect.yaml expects a "
            f"{ProcessWorker.type!r} pool. Delete it (prefect work-pool delete {name}) or "
            "point prefect.yaml at another pool."
        )
    return False


async def prepare_server(
    *,
    work_pool: str = WORK_POOL,
    lock: str = DEFAULT_LOCK,
    bucket: str | None = None,
    region: str | None = None,
    endpoint_url: str | None = None,
    webhook_url: str | None = None,
) -> Prepared:
    """Work pool, manifest lock and blocks on the server PREFECT_API_URL points at.

    `bucket` (re)writes the S3 blocks for a real bucket, with the default boto3
    credential chain (no keys stored); without it the S3 bucket block must exist already
    (`invoiceflow up` saves one for the local stack). `webhook_url` saves the Custom
    Webhook block the failure hook notifies by default.
    """
    done = Prepared()
    (done.created if await ensure_work_pool(work_pool) else done.kept).append(
        f"work pool {work_pool!r} (process)"
    )
    await ensure_manifest_lock(lock)
    done.kept.append(f"manifest lock {lock!r} (global concurrency limit 1)")
    if bucket:
        credentials = AwsCredentials(
            region_name=region,
            aws_client_parameters=AwsClientParameters(
                endpoint_url=endpoint_url, config=S3_CLIENT_CONFIG
            ),
        )
        await credentials.save(AWS_BLOCK, overwrite=True)
        await S3Bucket(bucket_name=bucket, credentials=credentials).save(
            BUCKET_BLOCK, overwrite=True
        )
        done.created.append(f"S3 bucket block {BUCKET_BLOCK!r} → s3://{bucket}")
    else:
        try:
            existing = await S3Bucket.load(BUCKET_BLOCK)
        except ValueError:
            raise DeployError(
                f"no S3 bucket block {BUCKET_BLOCK!r} on this server: run `invoiceflow up` "
                "for the local stack, or pass --bucket NAME (and --region) for real S3"
            ) from None
        done.kept.append(f"S3 bucket block {BUCKET_BLOCK!r} → s3://{existing.bucket_name}")
    extractor = await ensure_extractor_block()
    done.kept.append(f"extractor block {extractor._block_document_name!r} ({extractor.kind})")
    if webhook_url:
        await CustomWebhookNotificationBlock(
            name="invoiceflow",
            url=webhook_url,
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).save(DEFAULT_WEBHOOK_BLOCK, overwrite=True)
        done.created.append(f"custom webhook block {DEFAULT_WEBHOOK_BLOCK!r}")
    return done


def deploy_all(*, env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> None:
    """`prefect --no-prompt deploy --all` in the repository root, output passed through."""
    if not PREFECT_YAML.exists():
        raise DeployError(f"{PREFECT_YAML} not found; run from a checkout of invoiceflow")
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    result = subprocess.run(
        [*command, *(extra_args or [])], cwd=REPO_ROOT, env=env or dict(os.environ)
    )
    if result.returncode != 0:
        raise DeployError(f"`prefect deploy --all` failed with exit code {result.returncode}")


def worker_command(*, work_pool: str = WORK_POOL, limit: int | None = None) -> list[str]:
    """The command line of a process worker on `work_pool`."""
    command = [
        sys.executable, "-m", "prefect", "worker", "start",
        "--pool", work_pool, "--type", ProcessWorker.type,
    ]  # fmt: skip
    if limit:
        command += ["--limit", str(limit)]
    return command
