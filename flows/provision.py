"""Provision any stack for invoiceflow: bucket, storage blocks, extractor block, manifest
lock and sample invoices, on whatever Prefect server PREFECT_API_URL points at and
whatever S3 endpoint is given (the embedded stack, a team's server, real AWS).

Idempotent: what exists is reused or repaired. The storage blocks are rewritten each
time (they carry the endpoint); the extractor block is kept if the user edited it.
No AWS keys are stored unless asked: without them, flows use boto3's default
credential chain on the machine that runs them (instance role, env, ~/.aws).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from botocore.exceptions import ClientError
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from pydantic import SecretStr

from blocks.extractor import ExtractorBlock
from flows.lock import DEFAULT_LOCK, ensure_manifest_lock
from flows.s3 import s3_store
from invoiceflow import defaults
from invoiceflow.samples import generate_corpus
from invoiceflow.storage import S3_CLIENT_SETTINGS, S3Store

AWS_BLOCK = defaults.AWS_BLOCK
BUCKET_BLOCK = defaults.BUCKET_BLOCK
EXTRACTOR_BLOCK = defaults.EXTRACTOR_BLOCK
LOCAL_KEY = "invoiceflow-local"  # moto accepts any key; boto3 wants one to sign with

# botocore's standard retry mode handles 5xx / SlowDown / throttling / resets.
S3_CLIENT_CONFIG = {
    **S3_CLIENT_SETTINGS,  # the one retry configuration (invoiceflow/storage.py)
    "s3": {"addressing_style": "path"},
}


@dataclass
class Provisioned:
    """What provisioning created or found, in order, for the CLI to report."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    store: S3Store | None = None
    samples_uploaded: int = 0


@dataclass(frozen=True)
class StorageTarget:
    """Where the invoices live. `access_key` is None: no keys are stored in the block."""

    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None


async def save_storage_blocks(
    target: StorageTarget, *, aws_block: str = AWS_BLOCK, bucket_block: str = BUCKET_BLOCK
) -> S3Bucket:
    credentials = AwsCredentials(
        aws_access_key_id=target.access_key,
        aws_secret_access_key=SecretStr(target.secret_key) if target.secret_key else None,
        region_name=target.region,
        aws_client_parameters=AwsClientParameters(
            endpoint_url=target.endpoint_url, config=S3_CLIENT_CONFIG
        ),
    )
    await credentials.save(aws_block, overwrite=True)
    s3_bucket = S3Bucket(bucket_name=target.bucket, credentials=credentials)
    await s3_bucket.save(bucket_block, overwrite=True)
    return s3_bucket


async def ensure_extractor_block(name: str = EXTRACTOR_BLOCK) -> tuple[ExtractorBlock, bool]:
    """The extractor block, created with defaults (rules) if missing. (block, created)."""
    try:
        return await ExtractorBlock.load(name), False
    except ValueError:  # Prefect raises ValueError for a missing block document
        block = ExtractorBlock()
        await block.save(name)
        return block, True


async def lock_exists(name: str) -> bool:
    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def ensure_bucket(s3: S3Store, region: str | None) -> bool:
    """Create the bucket unless it exists (in `region`: S3 outside us-east-1 needs a
    LocationConstraint). Returns True if created."""
    try:
        s3.client.head_bucket(Bucket=s3.bucket)
        return False
    except ClientError:
        pass
    location = {"LocationConstraint": region} if region and region != "us-east-1" else None
    extra = {"CreateBucketConfiguration": location} if location else {}
    s3.client.create_bucket(Bucket=s3.bucket, **extra)
    return True


async def ensure_lock_and_extractor(lock: str, done: Provisioned) -> None:
    """The manifest lock (created, or repaired to an active limit of 1) and the
    extractor block (created with defaults unless it exists)."""
    had_lock = await lock_exists(lock)
    await ensure_manifest_lock(lock)
    (done.kept if had_lock else done.created).append(f"manifest lock {lock!r} (limit 1)")
    extractor, made = await ensure_extractor_block()
    line = f"extractor block {EXTRACTOR_BLOCK!r} ({extractor.kind})"
    (done.created if made else done.kept).append(line)


def upload_samples(s3: S3Store, prefix: str, n: int, seed: int = 0) -> int:
    """Upload `n` generated invoices under `prefix`; existing keys are left alone."""
    existing = {o.key for o in s3.list_sources(prefix)}
    uploaded = 0
    for stem, pdf, _truth in generate_corpus(n, seed=seed):
        key = f"{prefix}{stem}.pdf"
        if key not in existing:
            s3.put(key, pdf, content_type="application/pdf")
            uploaded += 1
    return uploaded


async def provision(
    target: StorageTarget,
    *,
    create_bucket: bool = False,
    samples: int = 0,
    prefix: str = defaults.SOURCE_PREFIX,
    lock: str = DEFAULT_LOCK,
    done: Provisioned | None = None,
) -> Provisioned:
    """Everything a run needs on this server and S3. Pass `done` to learn what was made
    even when a later step raises (e.g. the bucket is unreachable)."""
    done = done if done is not None else Provisioned()
    keys = "with stored keys" if target.access_key else "no keys stored (default chain)"
    s3_bucket = await save_storage_blocks(target)
    where = f" at {target.endpoint_url}" if target.endpoint_url else ""
    done.created.append(
        f"blocks {AWS_BLOCK!r} ({keys}) and {BUCKET_BLOCK!r} → s3://{target.bucket}{where}"
    )
    await ensure_lock_and_extractor(lock, done)
    if create_bucket or samples:
        done.store = s3_store(s3_bucket)
    if create_bucket:
        assert done.store is not None
        made = ensure_bucket(done.store, target.region)
        (done.created if made else done.kept).append(f"bucket s3://{target.bucket}")
    if samples:
        assert done.store is not None
        done.samples_uploaded = upload_samples(done.store, prefix, samples)
        done.created.append(f"{done.samples_uploaded} new sample invoices under {prefix}")
    return done


async def provision_local(
    *,
    bucket: str,
    endpoint_url: str,
    samples: int,
    prefix: str = defaults.SOURCE_PREFIX,
    lock: str = DEFAULT_LOCK,
) -> tuple[S3Store, int]:
    """The embedded (or production) stack's moto S3: bucket created, local keys stored.
    Returns the bucket store and how many samples were new."""
    target = StorageTarget(bucket, endpoint_url, "us-east-1", LOCAL_KEY, LOCAL_KEY)
    done = await provision(target, create_bucket=True, samples=samples, prefix=prefix, lock=lock)
    assert done.store is not None
    return done.store, done.samples_uploaded
