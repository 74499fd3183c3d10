"""Batch mode through the flows on the local stack (Prefect server, moto S3) and the
loopback OpenAI server: a batch run submits, an online run processes new invoices and
collects the batch at its end, collect-batches then finds nothing left."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow import stack
from invoiceflow.extractors.llm import TokenPrice
from invoiceflow.manifest import ManifestStore
from invoiceflow.samples import generate_corpus, generate_invoice
from invoiceflow.storage import S3Store

pytestmark = [pytest.mark.e2e, pytest.mark.batch]

API_KEY = "sk-batch-flow-" + uuid.uuid4().hex
PRICE = TokenPrice(
    input_per_million=Decimal("0.15"),
    cached_input_per_million=Decimal("0.075"),
    output_per_million=Decimal("0.60"),
    batch_input_per_million=Decimal("0.075"),
    batch_output_per_million=Decimal("0.30"),
)


@pytest.fixture(scope="module")
def s3(local_stack: stack.StackInfo) -> S3Store:
    from invoiceflow.storage import make_s3_client

    client = make_s3_client(
        endpoint_url=local_stack.s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x"
    )
    return S3Store(client, local_stack.bucket)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


def _no_writes() -> Any:
    raise AssertionError("tests only read the manifest")


async def test_batch_run_then_online_run_collects_it(
    s3: S3Store, llm: LLMServerHandle, unique_prefix: str
) -> None:
    from blocks.extractor import ExtractorBlock
    from flows.collect_batches import collect_batches
    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    block_name = f"batch-{uuid.uuid4().hex[:8]}"
    await ExtractorBlock(
        kind="openai",
        base_url=llm.base_url,
        model="test-model",
        api_key=SecretStr(API_KEY),
        prices={"test-model": PRICE},
        batch_max_requests=3,
    ).save(block_name)
    corpus = list(generate_corpus(6, seed=44))
    for stem, pdf, _ in corpus[:4]:
        s3.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    hybrid, _ = generate_invoice(8, language="de", einvoice="factur-x")
    s3.put(f"{unique_prefix}hybrid.pdf", hybrid, content_type="application/pdf")
    params = ProcessInvoicesParams(
        source_prefix=unique_prefix,
        manifest_key=f"manifests/{unique_prefix.rstrip('/')}.json",
        results_prefix=f"results/{unique_prefix}",
        commit_interval_s=0.2,
        extractor_block=block_name,
        llm_mode="batch",
    )
    llm.reset()

    batched = await process_invoices(params)
    assert (batched.submitted, batched.done, batched.failed) == (4, 1, 0)
    assert llm.stats()["batches"] == 2  # 4 requests, at most 3 a batch
    entries = ManifestStore(s3, params.manifest_key, lock=_no_writes).read_sync().entries
    assert sorted(e["status"] for e in entries.values()) == ["done"] + ["submitted"] * 4

    # Two new invoices; the online run processes them and then collects the batches.
    for stem, pdf, _ in corpus[4:]:
        s3.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    online = await process_invoices(params.model_copy(update={"llm_mode": "online"}))
    assert (online.processed, online.done, online.submitted) == (2, 2, 0)
    entries = ManifestStore(s3, params.manifest_key, lock=_no_writes).read_sync().entries
    assert {e["status"] for e in entries.values()} == {"done"}
    batch_costs = [Decimal(e["cost"]) for e in entries.values() if e.get("batch_id") is not None]
    assert len(batch_costs) == 4 and all(c > 0 for c in batch_costs)

    collected = await collect_batches(params)
    assert (collected.collected_batches, collected.open_batches, collected.done) == (0, 0, 0)
    stats = llm.stats()
    assert stats["by_key"] == {k: 1 for k in entries if not k.endswith("hybrid.pdf")}
