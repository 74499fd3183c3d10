"""What the batch-mode tests share: runs without Prefect on real S3 (moto) and the
loopback OpenAI server, and a batch run in a child process a test can kill.

`python tests/batch_support.py openai|bedrock ...` is that child: one batch run
(claim, parse, queue, submit), as `batch_run` does it in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

from devtools.llm_server import LLMServerHandle
from invoiceflow.batch import QUEUED_FOR_BATCH, BatchQueue, BatchRecords, CollectReport, collect
from invoiceflow.extractors.llm import TokenPrice
from invoiceflow.extractors.openai import OpenAIExtractor
from invoiceflow.extractors.openai_batch import OpenAIBatches
from invoiceflow.manifest import GroupCommitter, ManifestStore, RunLiveness, RunLookup
from invoiceflow.pipeline import InvoiceOutcome, InvoicePipeline, PipelineConfig
from invoiceflow.storage import S3Store, make_s3_client

API_KEY = "sk-batch-test"
PRICE = TokenPrice(
    input_per_million=Decimal("0.15"),
    cached_input_per_million=Decimal("0.075"),
    output_per_million=Decimal("0.60"),
    batch_input_per_million=Decimal("0.075"),
    batch_output_per_million=Decimal("0.30"),
)
REPO = Path(__file__).resolve().parent.parent


def upload(s3: S3Store, prefix: str, n: int, *, hybrid: bool = False, seed: int = 13) -> list[str]:
    from invoiceflow.samples import generate_corpus, generate_invoice  # not in the child

    keys = []
    for stem, pdf, _ in generate_corpus(n, seed=seed):
        s3.put(f"{prefix}{stem}.pdf", pdf, content_type="application/pdf")
        keys.append(f"{prefix}{stem}.pdf")
    if hybrid:
        pdf, _ = generate_invoice(3, language="de", einvoice="factur-x")
        s3.put(f"{prefix}hybrid.pdf", pdf, content_type="application/pdf")
    return keys


def make_extractor(llm: LLMServerHandle, **options: Any) -> OpenAIExtractor:
    return OpenAIExtractor(
        base_url=llm.base_url, api_key=API_KEY, model="m", price=PRICE, **options
    )


def ended(*run_ids: str) -> RunLookup:
    """What Prefect says once these runs crashed: ended, so their claims are dead."""

    async def lookup(holders: set[str]) -> RunLiveness:
        return RunLiveness(ended=frozenset(holders & set(run_ids)))

    return lookup


@contextlib.asynccontextmanager
async def pipeline_for(
    s3: S3Store,
    prefix: str,
    extractor: Any,
    run_id: str,
    lock: Callable[[], Any] = asyncio.Lock,
    runs: RunLookup | None = None,
) -> AsyncIterator[InvoicePipeline]:
    store = ManifestStore(s3, f"{prefix}manifest.json", lock=lock)
    config = PipelineConfig(prefix, f"{prefix}results/", run_id)
    async with GroupCommitter(store, max_wait_s=0.05) as committer:
        yield InvoicePipeline(s3, committer, extractor, config, runs)


def records_of(s3: S3Store, prefix: str) -> BatchRecords:
    return BatchRecords(s3, f"{prefix}manifest.json")


async def batch_run(
    s3: S3Store, prefix: str, llm: LLMServerHandle, run_id: str = "batch-run", **options: Any
) -> tuple[list[InvoiceOutcome], list[str]]:
    """A run in batch mode: claim, parse, e-invoices now, the rest as provider batches."""
    async with (
        make_extractor(llm, **options) as extractor,
        pipeline_for(s3, prefix, extractor, run_id) as pipeline,
    ):
        provider = OpenAIBatches(extractor)
        queue = BatchQueue(pipeline, extractor, provider, records_of(s3, prefix))
        pipeline.defer = queue.defer
        try:
            items = await pipeline.claim()
            outcomes = await asyncio.gather(*(pipeline.process(pipeline.parse(i)) for i in items))
            settled = await queue.submit()
        finally:
            await provider.aclose()
        now = [o for o in outcomes if o.error_kind != QUEUED_FOR_BATCH]
        return [*now, *settled], queue.batch_ids


async def online_run(
    s3: S3Store,
    prefix: str,
    llm: LLMServerHandle,
    run_id: str = "online-run",
    runs: RunLookup | None = None,
) -> list[InvoiceOutcome]:
    async with (
        make_extractor(llm) as extractor,
        pipeline_for(s3, prefix, extractor, run_id, runs=runs) as pipeline,
    ):
        items = await pipeline.claim()
        return list(await asyncio.gather(*(pipeline.process(pipeline.parse(i)) for i in items)))


async def collect_run(
    s3: S3Store,
    prefix: str,
    llm: LLMServerHandle,
    run_id: str = "collect-run",
    lock: Callable[[], Any] = asyncio.Lock,
    runs: RunLookup | None = None,
) -> CollectReport:
    async with make_extractor(llm) as extractor:
        provider = OpenAIBatches(extractor)
        try:
            async with pipeline_for(s3, prefix, extractor, run_id, lock, runs) as pipeline:
                return await collect(pipeline, extractor, provider, records_of(s3, prefix))
        finally:
            await provider.aclose()


def entries(s3: S3Store, prefix: str) -> dict[str, dict[str, Any]]:
    return ManifestStore(s3, f"{prefix}manifest.json", lock=asyncio.Lock).read_sync().entries


def statuses(s3: S3Store, prefix: str) -> dict[str, str]:
    return {k: e["status"] for k, e in entries(s3, prefix).items()}


def open_records(s3: S3Store, prefix: str) -> list[str]:
    return records_of(s3, prefix).keys()


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` (which may block briefly) until true, or fail after a deadline."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


def start_batch_run(
    provider: str, s3_endpoint: str, bucket: str, prefix: str, server_url: str, run_id: str
) -> subprocess.Popen[bytes]:
    """A batch run in a child process (`main` below), for a test to kill mid-submit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    args = [provider, s3_endpoint, bucket, prefix, server_url, run_id]
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _child_s3(endpoint: str, bucket: str) -> S3Store:
    client = make_s3_client(
        endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test"
    )
    return S3Store(client, bucket)


async def _child(argv: Iterable[str]) -> None:
    parser = argparse.ArgumentParser()
    for name in ("provider", "s3_endpoint", "bucket", "prefix", "server_url", "run_id"):
        parser.add_argument(name)
    args = parser.parse_args(list(argv))
    s3 = _child_s3(args.s3_endpoint, args.bucket)
    if args.provider == "openai":
        await batch_run(s3, args.prefix, LLMServerHandle.from_url(args.server_url), args.run_id)
        return
    from test_batch_bedrock import submit

    from devtools.bedrock_server import BedrockServerHandle

    server = LLMServerHandle.from_url(args.server_url)
    await submit(s3, args.prefix, BedrockServerHandle(server.host, server.port), args.run_id)


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1:]))
