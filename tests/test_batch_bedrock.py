"""Batch mode on Bedrock batch inference: JSONL in S3 (moto), create_model_invocation_job
on the loopback Bedrock server, answers read back from S3 and recorded through the
pipeline's own finish path; failed records and expired jobs are transient failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import boto3
import pytest
from batch_support import ended, start_batch_run, wait_until
from botocore.config import Config

from devtools.bedrock_server import BedrockServerHandle, running_bedrock_server
from invoiceflow.batch import QUEUED_FOR_BATCH, BatchQueue, BatchRecords, collect
from invoiceflow.extractors.bedrock import BedrockExtractor
from invoiceflow.extractors.bedrock_batch import MIN_RECORDS, BedrockBatches, BedrockBatchExtractor
from invoiceflow.extractors.llm import TokenPrice
from invoiceflow.manifest import GroupCommitter, ManifestStore, RunLookup, Status
from invoiceflow.pipeline import InvoicePipeline, PipelineConfig
from invoiceflow.samples import generate_corpus
from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import S3Store

pytestmark = pytest.mark.batch

ACCESS_KEY = "AKIABATCHTEST"
PRICE = TokenPrice(
    input_per_million=Decimal("0.80"),
    output_per_million=Decimal("4.00"),
    cached_input_per_million=Decimal("0.08"),
    cache_write_per_million=Decimal("1.00"),
    batch_input_per_million=Decimal("0.40"),
    batch_output_per_million=Decimal("2.00"),
)


@pytest.fixture(scope="module")
def bedrock(s3_endpoint: str) -> Iterator[BedrockServerHandle]:
    with running_bedrock_server(api_key=ACCESS_KEY, s3_endpoint=s3_endpoint) as handle:
        yield handle


def _client(service: str, server: BedrockServerHandle) -> Any:
    return boto3.client(
        service,
        region_name="eu-central-1",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key="secret",
        config=Config(retries={"mode": "standard", "total_max_attempts": 2}),
    )


@contextlib.asynccontextmanager
async def bedrock_batch(
    s3: S3Store,
    prefix: str,
    server: BedrockServerHandle,
    run_id: str,
    runs: RunLookup | None = None,
    min_records: int = 1,  # the loopback's; Bedrock's is MIN_RECORDS
) -> AsyncIterator[tuple[InvoicePipeline, BedrockBatchExtractor, BedrockBatches, BatchRecords]]:
    extractor = BedrockExtractor(
        client=_client("bedrock-runtime", server), model_id="anthropic.claude", price=PRICE
    )
    provider = BedrockBatches(
        extractor,
        control_client=_client("bedrock", server),
        s3_client=s3.client,
        s3_uri=f"s3://{s3.bucket}/{prefix}bedrock-batches/",
        role_arn="arn:aws:iam::000000000000:role/bedrock-batch",
        min_records=min_records,
    )
    store = ManifestStore(s3, f"{prefix}manifest.json", lock=asyncio.Lock)
    config = PipelineConfig(prefix, f"{prefix}results/", run_id)
    async with extractor, GroupCommitter(store, max_wait_s=0.05) as committer:
        pipeline = InvoicePipeline(s3, committer, extractor, config, runs)
        records = BatchRecords(s3, f"{prefix}manifest.json")
        yield pipeline, BedrockBatchExtractor(extractor), provider, records


def entries(s3: S3Store, prefix: str) -> dict[str, dict[str, Any]]:
    return ManifestStore(s3, f"{prefix}manifest.json", lock=asyncio.Lock).read_sync().entries


async def submit(
    s3: S3Store, prefix: str, server: BedrockServerHandle, run_id: str = "batch-run"
) -> list[str]:
    async with bedrock_batch(s3, prefix, server, run_id) as (pipeline, ex, provider, rec):
        queue = BatchQueue(pipeline, ex, provider, rec)
        pipeline.defer = queue.defer
        items = await pipeline.claim()
        outcomes = await asyncio.gather(*(pipeline.process(pipeline.parse(i)) for i in items))
        assert all(o.error_kind == QUEUED_FOR_BATCH for o in outcomes)
        settled = await queue.submit()
        assert {o.status for o in settled} == {Status.submitted}
        return queue.batch_ids


async def collect_once(
    s3: S3Store, prefix: str, server: BedrockServerHandle, runs: RunLookup | None = None
) -> Any:
    async with bedrock_batch(s3, prefix, server, "collect", runs) as (pipeline, ex, prov, rec):
        return await collect(pipeline, ex, prov, rec)


async def test_bedrock_job_submit_collect_failed_record(
    s3_store: S3Store, unique_prefix: str, bedrock: BedrockServerHandle
) -> None:
    bedrock.reset()
    corpus = list(generate_corpus(4, seed=71))
    for stem, pdf, _ in corpus:
        s3_store.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    failing_key = f"{unique_prefix}{corpus[0][0]}.pdf"
    bedrock.configure_batches(fail=[str(corpus[0][2].invoice_number)])

    (job,) = await submit(s3_store, unique_prefix, bedrock)
    assert job.startswith("arn:aws:bedrock:")
    assert {e["status"] for e in entries(s3_store, unique_prefix).values()} == {"submitted"}
    assert bedrock.stats()["batch_lines"] == 4

    report = await collect_once(s3_store, unique_prefix, bedrock)
    assert report.collected_batches == [job]
    final = entries(s3_store, unique_prefix)
    assert final[failing_key]["status"] == "failed" and final[failing_key]["transient"]
    assert final[failing_key]["error_kind"] == "batch_line_failed"
    done = [e for k, e in final.items() if k != failing_key]
    assert [e["status"] for e in done] == ["done"] * 3
    results = [
        ExtractionResult.model_validate_json(s3_store.get(e["result_key"]).body) for e in done
    ]
    for result in results:
        assert result.usage is not None and result.cost == PRICE.cost(result.usage, batch=True)
    # The cache_control system text: written by the first answered record, read after.
    assert sorted(r.usage.cache_write_tokens > 0 for r in results if r.usage) == [
        False,
        False,
        True,
    ]
    assert sum(r.usage.cached_tokens > 0 for r in results if r.usage) == 2
    assert bedrock.stats()["total"] == 4  # nothing but the four records was requested


async def test_an_expired_bedrock_job_releases_its_invoices(
    s3_store: S3Store, unique_prefix: str, bedrock: BedrockServerHandle
) -> None:
    bedrock.reset()
    for stem, pdf, _ in generate_corpus(2, seed=72):
        s3_store.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    bedrock.configure_batches(expire=True)
    await submit(s3_store, unique_prefix, bedrock)
    report = await collect_once(s3_store, unique_prefix, bedrock)
    assert len(report.collected_batches) == 1
    final = entries(s3_store, unique_prefix)
    assert {(e["status"], e["error_kind"]) for e in final.values()} == {("failed", "batch_expired")}


async def test_a_run_killed_after_bedrock_accepted_its_job_bills_it_once(
    s3_store: S3Store, s3_endpoint: str, unique_prefix: str, bedrock: BedrockServerHandle
) -> None:
    bedrock.reset()
    for stem, pdf, _ in generate_corpus(2, seed=73):
        s3_store.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    bedrock.configure_batches(stall_create_s=120)
    child = start_batch_run(
        "bedrock", s3_endpoint, s3_store.bucket, unique_prefix, bedrock.root_url, "killed"
    )
    try:  # the job is accepted, and the run never hears back
        await wait_until(lambda: bedrock.stats()["batches"] == 1, 60, "the job was created")
    finally:
        child.kill()
        child.wait(10)
    bedrock.configure_batches(stall_create_s=0)

    # Prefect reports the run as crashed: a new run claims none of its invoices, and the
    # collect finds the job by its name and records it.
    async with bedrock_batch(s3_store, unique_prefix, bedrock, "next", ended("killed")) as (
        pipeline, *_,
    ):  # fmt: skip
        assert await pipeline.claim() == []
    report = await collect_once(s3_store, unique_prefix, bedrock, ended("killed"))
    assert len(report.collected_batches) == 1
    final = entries(s3_store, unique_prefix)
    assert {e["status"] for e in final.values()} == {"done"}
    assert bedrock.stats()["batch_lines"] == 2 and bedrock.stats()["total"] == 2


async def test_fewer_records_than_bedrock_takes_are_sent_online_in_the_same_run(
    s3_store: S3Store, unique_prefix: str, bedrock: BedrockServerHandle, caplog: Any
) -> None:
    bedrock.reset()
    bedrock.configure_batches(min_records=MIN_RECORDS)  # Bedrock's default quota
    for stem, pdf, _ in generate_corpus(2, seed=74):
        s3_store.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    async with bedrock_batch(
        s3_store, unique_prefix, bedrock, "small-run", min_records=MIN_RECORDS
    ) as (
        pipeline, ex, provider, records,
    ):  # fmt: skip
        queue = BatchQueue(pipeline, ex, provider, records)
        pipeline.defer = queue.defer
        items = await pipeline.claim()
        await asyncio.gather(*(pipeline.process(pipeline.parse(i)) for i in items))
        with caplog.at_level(logging.INFO, logger="invoiceflow.batch"):
            outcomes = await queue.submit()

    assert {(o.status, o.recorded) for o in outcomes} == {(Status.done, True)}
    assert "sent online" in caplog.text and f"at least {MIN_RECORDS}" in caplog.text
    final = entries(s3_store, unique_prefix)
    assert {e["status"] for e in final.values()} == {"done"}
    for entry in final.values():  # billed online, at the full price
        result = ExtractionResult.model_validate_json(s3_store.get(entry["result_key"]).body)
        assert result.usage is not None and result.cost == PRICE.cost(result.usage)
    stats = bedrock.stats()
    assert (stats["batches"], stats["batch_lines"], stats["total"]) == (0, 0, 2)
    assert BatchRecords(s3_store, f"{unique_prefix}manifest.json").keys() == []
