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
from pathlib import Path

import yaml
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker
from prefect_aws import S3Bucket

from flows.lock import DEFAULT_LOCK
from flows.notify import DEFAULT_WEBHOOK_BLOCK
from flows.provision import (
    BUCKET_BLOCK,
    Provisioned,
    StorageTarget,
    ensure_lock_and_extractor,
    provision,
)

WORK_POOL = "invoices"
REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "prefect.yaml"


class DeployError(RuntimeError):
    """The server cannot take the deployments yet; the message says what to do."""


async def _read_pool_type(name: str) -> str | None:
    async with get_client() as client:
        try:
            return (await client.read_work_pool(name)).type
        except ObjectNotFound:
            return None


async def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool `name` unless it exists. Returns True if created."""
    if await _read_pool_type(name) is not None:
        return False
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="invoiceflow: flow runs as subprocesses of `make worker`.",
            )
        )
    return True


async def _preflight(work_pool: str, target: StorageTarget | None) -> str:
    """Everything that can refuse the deploy, checked before anything is made.

    Returns the bucket the deployments will use. A failed deploy so leaves the server as
    it was (the issue: the work pool used to be created before the bucket check failed).
    """
    pool_type = await _read_pool_type(work_pool)
    if pool_type not in (None, ProcessWorker.type):
        raise DeployError(
            f"work pool {work_pool!r} exists with type {pool_type!r}; prefect.yaml expects a "
            f"{ProcessWorker.type!r} pool. Delete it (prefect work-pool delete {work_pool}) "
            "or point prefect.yaml at another pool."
        )
    if target is not None:
        return target.bucket
    try:
        return (await S3Bucket.load(BUCKET_BLOCK)).bucket_name
    except ValueError:
        api = os.environ.get("PREFECT_API_URL", "the local stack")
        raise DeployError(
            f"no S3 bucket block {BUCKET_BLOCK!r} on {api}; nothing was created. Pass "
            "--bucket NAME (and --endpoint-url/--region; `make deploy BUCKET=… ENDPOINT=… "
            "REGION=…`), or run `invoiceflow provision --bucket NAME` first."
        ) from None


async def prepare_server(
    *,
    work_pool: str = WORK_POOL,
    lock: str = DEFAULT_LOCK,
    target: StorageTarget | None = None,
    webhook_url: str | None = None,
    done: Provisioned | None = None,
) -> Provisioned:
    """Work pool, manifest lock and blocks on the server PREFECT_API_URL points at.

    `target` (re)writes the S3 blocks for that bucket through `provision` (no keys
    stored unless the target has them); without it the S3 bucket block must exist
    already. `webhook_url` saves the Custom Webhook block the failure hook notifies by
    default. Pass `done` to know what was made if a step fails half-way.
    """
    done = done if done is not None else Provisioned()
    bucket = await _preflight(work_pool, target)
    if target is not None:
        await provision(target, lock=lock, done=done)
    else:
        done.kept.append(f"S3 bucket block {BUCKET_BLOCK!r} → s3://{bucket}")
        await ensure_lock_and_extractor(lock, done)
    made_pool = await ensure_work_pool(work_pool)
    (done.created if made_pool else done.kept).append(f"work pool {work_pool!r} (process)")
    if webhook_url:
        await CustomWebhookNotificationBlock(
            name="invoiceflow",
            url=webhook_url,
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
        ).save(DEFAULT_WEBHOOK_BLOCK, overwrite=True)
        done.created.append(f"custom webhook block {DEFAULT_WEBHOOK_BLOCK!r}")
    return done


def prefect_file_with_git_pull(repository: str, branch: str | None, directory: Path) -> Path:
    """prefect.yaml with its pull step replaced by Prefect's `git_clone`.

    Every flow run then clones `repository` (at `branch`) into its working directory and
    runs the flow from that clone, so a worker needs no checkout of its own, on any
    machine (the recorded-path pull step needs the checkout at the same absolute path).
    `git_clone` returns the clone's `directory`, which the runner changes into.
    """
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    clone: dict[str, str] = {"repository": repository}
    if branch:
        clone["branch"] = branch
    spec["build"] = None  # the checkout's path means nothing to a remote worker
    spec["pull"] = [{"prefect.deployments.steps.git_clone": clone}]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "prefect.git-pull.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def deploy_all(
    *,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    prefect_file: Path | None = None,
) -> None:
    """`prefect --no-prompt deploy --all` in the repository root, output passed through."""
    if not PREFECT_YAML.exists():
        raise DeployError(f"{PREFECT_YAML} not found; run from a checkout of invoiceflow")
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    if prefect_file is not None:
        command += ["--prefect-file", str(prefect_file)]
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
