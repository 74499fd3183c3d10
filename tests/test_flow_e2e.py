"""End to end: the real flow on a real Prefect server, moto's S3 and the loopback LLM."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow import stack
from invoiceflow.evaluate import HEADER_FIELDS
from invoiceflow.manifest import ManifestStore, Status
from invoiceflow.samples import generate_corpus
from invoiceflow.schema import ExtractionResult, Invoice
from invoiceflow.storage import S3Store, invoice_id

pytestmark = pytest.mark.e2e

N_INVOICES = 60
API_KEY = "sk-test-e2e-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def s3(local_stack: stack.StackInfo) -> S3Store:
    from invoiceflow.storage import make_s3_client

    client = make_s3_client(
        endpoint_url=local_stack.s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x"
    )
    return S3Store(client, local_stack.bucket)


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, bytes, Invoice]]:
    return list(generate_corpus(N_INVOICES, seed=7))


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(latency_s=0.05, jitter_s=0.02, api_key=API_KEY) as handle:
        yield handle


def upload(
    s3: S3Store, prefix: str, corpus: list[tuple[str, bytes, Invoice]]
) -> dict[str, Invoice]:
    truth = {}
    for stem, pdf, inv in corpus:
        s3.put(f"{prefix}{stem}.pdf", pdf, content_type="application/pdf")
        truth[f"{prefix}{stem}.pdf"] = inv
    return truth


def manifest(s3: S3Store, key: str) -> dict[str, dict[str, Any]]:
    return ManifestStore(s3, key, lock=_no_writes).read_sync().entries


def _no_writes() -> Any:
    raise AssertionError("tests only read the manifest")


async def run_flow(**params: Any) -> Any:
    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    return await process_invoices(ProcessInvoicesParams(**params))


def params_for(prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "source_prefix": prefix,
        "manifest_key": f"manifests/{prefix.rstrip('/')}.json",
        "results_prefix": f"results/{prefix}",
        "max_llm_concurrency": 8,
        "commit_interval_s": 0.2,
        **extra,
    }


def assert_all_done_and_correct(
    s3: S3Store, params: dict[str, Any], truth: dict[str, Invoice]
) -> None:
    entries = manifest(s3, params["manifest_key"])
    assert set(entries) == set(truth)
    assert {e["status"] for e in entries.values()} == {Status.done}
    for key, expected in truth.items():
        entry = entries[key]
        assert entry["result_key"] == f"{params['results_prefix']}{invoice_id(key)}.json"
        result = ExtractionResult.model_validate_json(s3.get(entry["result_key"]).body)
        assert result.source_etag == entry["source_etag"]
        for field in HEADER_FIELDS:
            assert getattr(result.invoice, field) == getattr(expected, field), (key, field)


async def test_rules_pipeline_processes_every_invoice_once(
    s3: S3Store, corpus: list[tuple[str, bytes, Invoice]], unique_prefix: str
) -> None:
    truth = upload(s3, unique_prefix, corpus)
    params = params_for(unique_prefix)
    summary = await run_flow(**params)
    assert summary.processed == summary.done == N_INVOICES
    assert_all_done_and_correct(s3, params, truth)
    revision_after_first = ManifestStore(s3, params["manifest_key"], lock=_no_writes).read_sync()
    # Group commit: far fewer manifest writes than the ~3 updates per invoice.
    assert revision_after_first.revision < N_INVOICES

    again = await run_flow(**params)
    assert again.processed == 0
    assert ManifestStore(s3, params["manifest_key"], lock=_no_writes).read_sync().revision == (
        revision_after_first.revision
    )


async def test_openai_pipeline_through_the_loopback_llm(
    s3: S3Store,
    corpus: list[tuple[str, bytes, Invoice]],
    unique_prefix: str,
    llm: LLMServerHandle,
) -> None:
    from blocks.extractor import ExtractorBlock

    block_name = f"llm-{uuid.uuid4().hex[:8]}"
    await ExtractorBlock(
        kind="openai",
        base_url=llm.base_url,
        model="test-model",
        api_key=SecretStr(API_KEY),
        max_retries=2,
    ).save(block_name)
    truth = upload(s3, unique_prefix, corpus)
    params = params_for(unique_prefix, extractor_block=block_name)
    llm.reset()
    summary = await run_flow(**params)
    assert summary.done == N_INVOICES
    assert_all_done_and_correct(s3, params, truth)
    stats = llm.stats()
    # Exactly one LLM call per invoice, and the concurrency bound held.
    assert {k: v for k, v in stats["by_key"].items()} == {k: 1 for k in truth}
    assert 1 < stats["max_in_flight"] <= 8
    entries = manifest(s3, params["manifest_key"])
    assert {e["extractor"] for e in entries.values()} == {"openai"}
    assert API_KEY not in s3.get(params["manifest_key"]).body.decode()

    llm.reset()
    assert (await run_flow(**params)).processed == 0
    assert llm.stats()["total"] == 0


async def test_concurrent_runs_on_one_manifest_lose_nothing(
    s3: S3Store, corpus: list[tuple[str, bytes, Invoice]], unique_prefix: str
) -> None:
    """Two flow runs race over one prefix and one manifest: each has its own committer."""
    truth = upload(s3, unique_prefix, corpus[:30])
    params = params_for(unique_prefix)
    a, b = await asyncio.gather(run_flow(**params), run_flow(**params))
    # Claims make the runs split the work instead of doing it twice.
    assert a.processed + b.processed == len(truth)
    assert_all_done_and_correct(s3, params, truth)


async def test_missing_lock_fails_before_any_llm_call(
    s3: S3Store,
    corpus: list[tuple[str, bytes, Invoice]],
    unique_prefix: str,
    llm: LLMServerHandle,
) -> None:
    from blocks.extractor import ExtractorBlock
    from flows.lock import ManifestLockError

    block_name = f"llm-{uuid.uuid4().hex[:8]}"
    await ExtractorBlock(kind="openai", base_url=llm.base_url, api_key=SecretStr(API_KEY)).save(
        block_name
    )
    upload(s3, unique_prefix, corpus[:3])
    llm.reset()
    missing = f"no-such-lock-{uuid.uuid4().hex[:6]}"
    params = params_for(unique_prefix, extractor_block=block_name, manifest_lock=missing)
    with pytest.raises(ManifestLockError, match=f"prefect gcl create {missing} --limit 1"):
        await run_flow(**params)
    assert llm.stats()["total"] == 0
    with pytest.raises(KeyError):
        s3.get(params["manifest_key"])


async def test_inactive_or_wider_lock_is_refused(s3: S3Store, unique_prefix: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.lock import ManifestLockError

    inactive, wide = (f"lock-{uuid.uuid4().hex[:6]}" for _ in range(2))
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=inactive, limit=1, active=False)
        )
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=wide, limit=3)
        )
    with pytest.raises(ManifestLockError, match="--enable"):
        await run_flow(**params_for(unique_prefix, manifest_lock=inactive))
    with pytest.raises(ManifestLockError, match="--limit 1"):
        await run_flow(**params_for(unique_prefix, manifest_lock=wide))
