"""Security: the API key never leaks, result keys are safe, sizes are bounded."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
from faults_support import (
    create_flow_run,
    create_lock,
    direct_s3,
    flow_params,
    good_invoices,
    list_keys,
    manifest_entries,
    run_flow,
    run_flow_by_engine,
    save_llm_block,
    unique,
    upload,
)

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow import stack
from invoiceflow.extractors import ExtractionError
from invoiceflow.manifest import ManifestStore, ManifestTooLarge, Status, Transition
from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import S3Store

API_KEY = "sk-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def s3(local_stack: stack.StackInfo) -> S3Store:
    return direct_s3(local_stack.s3_endpoint, local_stack.bucket)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(latency_s=0.01, api_key=API_KEY) as handle:
        yield handle


@pytest.mark.e2e
async def test_the_api_key_is_in_no_log_manifest_artifact_or_result(
    s3: S3Store, llm: LLMServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    prefix = unique("secret") + "/"
    listed = sorted(upload(s3, prefix, good_invoices(6, seed=67)))
    rejected, flaky = listed[0], listed[1]
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=await save_llm_block(llm.base_url, API_KEY, max_retries=1),
    )
    llm.reset()
    # Error paths log the most: one permanent 400, one 500 outlasting the SDK's retry.
    llm.set_faults(
        [
            {"match": rejected, "status": 400, "times": -1},
            {"match": flaky, "status": 500, "times": 2},
        ]
    )
    caplog.set_level(logging.DEBUG)  # every logger in this process, the SDKs' included
    run_id = await create_flow_run(params)
    async with get_client() as client:
        flow_run = await client.read_flow_run(run_id)
    with pytest.raises(Exception, match="2 of 6 invoices failed"):
        await run_flow_by_engine(flow_run)
    await APILogHandler.aflush()
    llm.set_faults([])

    stats = llm.stats()
    assert stats["by_status"].get("401", 0) == 0 and stats["by_status"]["200"] == 4  # it travelled
    haystacks: dict[str, str] = {"process logs": caplog.text}
    async with get_client() as client:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        flow_run = await client.read_flow_run(run_id)
        block = await client.read_block_document_by_name(
            params["extractor_block"], "invoice-extractor", include_secrets=False
        )
    haystacks["run logs"] = "\n".join(log.message for log in logs)
    haystacks["artifacts"] = "\n".join(f"{a.key} {a.description} {a.data}" for a in artifacts)
    haystacks["flow run"] = flow_run.model_dump_json()
    haystacks["block (as the UI reads it)"] = block.model_dump_json()
    haystacks["manifest"] = s3.get(params["manifest_key"]).body.decode()
    for key in list_keys(s3, params["results_prefix"]):
        haystacks[key] = s3.get(key).body.decode()

    # The searches are real: the failures are logged, the artifacts and results exist.
    assert "bad_request" in haystacks["run logs"] and "server_error" in haystacks["run logs"]
    assert {a.key for a in artifacts} >= {"invoices", "run-summary"}
    assert len(haystacks) == 6 + 4  # the 4 invoices that were done have a result each
    # The whole key, and its random part alone (in case something masked the prefix).
    needles = (API_KEY, API_KEY.removeprefix("sk-secret-"), API_KEY[-16:])
    leaks = {name for name, text in haystacks.items() if any(n in text for n in needles)}
    assert not leaks, f"the API key leaked into: {sorted(leaks)}"


@pytest.mark.e2e
async def test_unicode_spaces_and_hostile_names_get_safe_distinct_result_keys(
    s3: S3Store, llm: LLMServerHandle
) -> None:
    prefix = unique("names") + "/"
    names = [
        "Rechnung März 2026.pdf",
        "facture été n° 7.pdf",
        "sub folder/with space.pdf",
        "../../escape.pdf",
        "a%20b+c&d=e.pdf",
        "receipt 🧾 #3.pdf",
        "UPPER.PDF",
        "a?b.pdf",  # these two sanitise to the same name
        "a*b.pdf",
        "x" * 150 + ".pdf",
    ]
    pdfs = good_invoices(len(names), seed=71)
    listed = upload(s3, prefix, [(n, pdf) for n, (_, pdf) in zip(names, pdfs, strict=True)])
    assert len(listed) == len(names)
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=await save_llm_block(llm.base_url, API_KEY),
    )
    llm.reset()
    summary = await run_flow(params)
    assert summary.done == len(names), summary

    entries = manifest_entries(s3, params["manifest_key"])
    result_keys = {entries[k]["result_key"] for k in listed}
    assert len(result_keys) == len(listed)  # distinct
    for key in listed:
        rkey = entries[key]["result_key"]
        rel = rkey.removeprefix(params["results_prefix"])
        assert rkey.startswith(params["results_prefix"]) and "/" not in rel, rkey
        assert ".." not in rkey.split("/"), rkey
        result = ExtractionResult.model_validate_json(s3.get(rkey).body)
        assert result.source_key == key
    # The X-Invoice-Key header (percent-encoded) carried every name intact.
    assert llm.stats()["by_key"] == {k: 1 for k in listed}


async def test_manifest_size_is_bounded_on_write_and_on_read(s3_store: S3Store) -> None:
    import asyncio

    from invoiceflow.manifest import Claim

    lock = asyncio.Lock()
    store = ManifestStore(s3_store, "m.json", lock=lambda: lock, max_bytes=4_000)
    await store.commit([Claim(f"in/{i:03}.pdf", "etag", "run") for i in range(10)])
    before = store.read_sync()
    with pytest.raises(ManifestTooLarge, match="4000"):
        await store.commit([Claim(f"in/more-{i:03}.pdf", "etag", "run") for i in range(30)])
    after = store.read_sync()
    assert (after.revision, after.entries) == (before.revision, before.entries)  # nothing written
    # An updated invoice is still writable: the bound stops growth, not work.
    done = await store.commit([Transition("in/000.pdf", 1, Status.processing)])
    assert done[0].applied

    small = ManifestStore(s3_store, "m.json", lock=lambda: lock, max_bytes=1_000)
    with pytest.raises(ValueError, match="over the 1000 limit"):
        small.read_sync()  # refused before it is downloaded


async def test_an_oversized_llm_answer_is_refused_unread_and_not_retried(
    llm: LLMServerHandle,
) -> None:
    from invoiceflow.extractors.openai import OpenAIExtractor

    extractor = OpenAIExtractor(
        base_url=llm.base_url, api_key=API_KEY, max_retries=3, max_response_bytes=50_000
    )
    llm.reset()
    try:
        assert (await extractor.extract("Invoice INV-77\nTotal 10.00 EUR")) is not None
        llm.set_answers({"*": "x" * 60_000})  # a 60 KB "answer"
        with pytest.raises(ExtractionError) as failure:
            await extractor.extract("Invoice INV-78\nTotal 10.00 EUR")
    finally:
        llm.set_answers({})
        await extractor.aclose()
    assert (failure.value.kind, failure.value.transient) == ("response_too_big", False)
    assert "50000" in str(failure.value)
    assert llm.stats()["total"] == 2  # one good call, one refused: the SDK did not retry it
