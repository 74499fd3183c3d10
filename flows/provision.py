"""Provision a stack for invoiceflow: bucket, manifest lock, blocks and sample invoices.

Idempotent: what exists is reused. The storage blocks are rewritten each time because
they carry the local S3 port; the extractor block is kept if the user edited it.
"""

from __future__ import annotations

from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from pydantic import SecretStr

from blocks.extractor import ExtractorBlock
from flows.lock import DEFAULT_LOCK, ensure_manifest_lock
from invoiceflow.samples import generate_corpus
from invoiceflow.storage import S3_CLIENT_SETTINGS, S3Store

AWS_BLOCK = "invoiceflow-aws"
BUCKET_BLOCK = "invoiceflow-bucket"
EXTRACTOR_BLOCK = "invoiceflow-extractor"

# botocore's standard retry mode handles 5xx / SlowDown / throttling / resets.
S3_CLIENT_CONFIG = {
    **S3_CLIENT_SETTINGS,  # the one retry configuration (invoiceflow/storage.py)
    "s3": {"addressing_style": "path"},
}


async def save_storage_blocks(
    *,
    bucket: str,
    endpoint_url: str | None,
    access_key: str,
    secret_key: str,
    region: str = "us-east-1",
    aws_block: str = AWS_BLOCK,
    bucket_block: str = BUCKET_BLOCK,
) -> S3Bucket:
    credentials = AwsCredentials(
        aws_access_key_id=access_key,
        aws_secret_access_key=SecretStr(secret_key),
        region_name=region,
        aws_client_parameters=AwsClientParameters(
            endpoint_url=endpoint_url, config=S3_CLIENT_CONFIG
        ),
    )
    await credentials.save(aws_block, overwrite=True)
    s3_bucket = S3Bucket(bucket_name=bucket, credentials=credentials)
    await s3_bucket.save(bucket_block, overwrite=True)
    return s3_bucket


async def ensure_extractor_block(name: str = EXTRACTOR_BLOCK) -> ExtractorBlock:
    try:
        return await ExtractorBlock.load(name)
    except ValueError:  # Prefect raises ValueError for a missing block document
        block = ExtractorBlock()
        await block.save(name)
        return block


def upload_samples(s3: S3Store, prefix: str, n: int, seed: int = 0) -> int:
    """Upload `n` generated invoices under `prefix`; existing keys are left alone."""
    existing = {o.key for o in s3.list_pdfs(prefix)}
    uploaded = 0
    for stem, pdf, _truth in generate_corpus(n, seed=seed):
        key = f"{prefix}{stem}.pdf"
        if key not in existing:
            s3.put(key, pdf, content_type="application/pdf")
            uploaded += 1
    return uploaded


async def provision_local(
    *,
    bucket: str,
    endpoint_url: str,
    samples: int,
    prefix: str = "incoming/",
    lock: str = DEFAULT_LOCK,
) -> tuple[S3Store, int]:
    """Everything a local run needs. Returns the bucket store and how many samples were new."""
    s3_bucket = await save_storage_blocks(
        bucket=bucket,
        endpoint_url=endpoint_url,
        access_key="invoiceflow-local",
        secret_key="invoiceflow-local",
    )
    s3 = S3Store(s3_bucket.credentials.get_s3_client(), bucket)
    s3.ensure_bucket()
    await ensure_manifest_lock(lock)
    await ensure_extractor_block()
    return s3, upload_samples(s3, prefix, samples)
