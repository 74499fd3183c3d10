"""The flow with a priced, limited LLM block: usage and cost in results, manifest and
run summary; the provider limit enforced; e-invoices and duplicates on the way."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr

from devtools.llm_server import LLMServerHandle, running_llm_server, utilisation
from invoiceflow import stack
from invoiceflow.extractors.llm import TokenPrice
from invoiceflow.manifest import ManifestStore
from invoiceflow.samples import generate_corpus, generate_invoice, stated_fields
from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import S3Store

pytestmark = [pytest.mark.e2e, pytest.mark.llm]

API_KEY = "sk-llm-flow-" + uuid.uuid4().hex
PRICE = TokenPrice(
    input_per_million=Decimal("0.15"),
    output_per_million=Decimal("0.60"),
    cached_input_per_million=Decimal("0.075"),
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
    with running_llm_server(latency_s=0.1, api_key=API_KEY) as handle:
        yield handle


def _no_writes() -> Any:
    raise AssertionError("tests only read the manifest")


async def test_priced_limited_llm_run(
    s3: S3Store, llm: LLMServerHandle, unique_prefix: str
) -> None:
    from blocks.extractor import ExtractorBlock
    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    block_name = f"priced-{uuid.uuid4().hex[:8]}"
    await ExtractorBlock(
        kind="openai",
        base_url=llm.base_url,
        model="test-model",
        api_key=SecretStr(API_KEY),
        max_retries=2,
        max_in_flight=3,
        requests_per_minute=6000,
        prices={"test-model": PRICE},
    ).save(block_name)

    corpus = list(generate_corpus(12, seed=21))
    for stem, pdf, _ in corpus:
        s3.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    # A copy of the first invoice under another name, and one hybrid e-invoice.
    s3.put(f"{unique_prefix}zz-copy.pdf", corpus[0][1], content_type="application/pdf")
    hybrid, hybrid_truth = generate_invoice(5, language="de", einvoice="factur-x")
    s3.put(f"{unique_prefix}hybrid.pdf", hybrid, content_type="application/pdf")

    params = ProcessInvoicesParams(
        source_prefix=unique_prefix,
        manifest_key=f"manifests/{unique_prefix.rstrip('/')}.json",
        results_prefix=f"results/{unique_prefix}",
        max_llm_concurrency=8,
        commit_interval_s=0.2,
        extractor_block=block_name,
    )
    llm.reset()
    summary = await process_invoices(params)

    assert summary.done == 14 and summary.failed == 0
    stats = llm.stats()
    # 13 LLM calls (the e-invoice needs none), at most 3 at a time though the run allows 8.
    assert stats["total"] == 13
    assert f"{unique_prefix}hybrid.pdf" not in stats["by_key"]
    assert stats["max_in_flight"] <= 3
    assert 0 < utilisation(stats, slots=3) <= 1

    entries = ManifestStore(s3, params.manifest_key, lock=_no_writes).read_sync().entries
    priced = [e for e in entries.values() if e["source"] == "llm"]
    assert len(priced) == 13
    cost = sum((Decimal(e["cost"]) for e in priced), Decimal(0))
    assert summary.cost == str(cost) and cost > 0
    assert summary.prompt_tokens == sum(e["tokens_in"] for e in priced)
    assert summary.completion_tokens == sum(e["tokens_out"] for e in priced)
    # Prompt caching: the static prefix is served from the cache from the second call
    # on (the loopback stores a prefix on arrival), counted at the server.
    assert sum(e["tokens_cached"] > 0 for e in priced) == 12
    assert summary.cached_tokens == sum(e["tokens_cached"] for e in priced)
    assert summary.cached_tokens == stats["cached_tokens"] > 0
    assert summary.duplicates == 1
    # Whichever of the twins committed second is the duplicate of the other.
    twins = {f"{unique_prefix}zz-copy.pdf", f"{unique_prefix}invoice-0000.pdf"}
    flagged = {k: e.get("duplicate_of") for k, e in entries.items() if e.get("duplicate_of")}
    assert len(flagged) == 1
    ((second, first),) = flagged.items()
    assert {second, first} == twins
    assert entries[second]["needs_review"] is True

    hybrid_entry = entries[f"{unique_prefix}hybrid.pdf"]
    assert hybrid_entry["source"] == "einvoice" and hybrid_entry.get("cost") is None
    result = ExtractionResult.model_validate_json(s3.get(hybrid_entry["result_key"]).body)
    # The XML states more than the generator's truth (document type, VAT lines, addresses).
    assert stated_fields(result.invoice) == hybrid_truth
    assert result.invoice.document_type == "invoice"

    one = ExtractionResult.model_validate_json(s3.get(priced[0]["result_key"]).body)
    assert one.usage is not None and one.cost == PRICE.cost(one.usage)
    assert one.cost_currency == "USD" and one.model == "test-model"
    assert API_KEY not in s3.get(params.manifest_key).body.decode()
