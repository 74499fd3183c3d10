"""Security: the API key never leaks, result keys are safe, sizes are bounded."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator

import pytest
from support import (
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
from invoiceflow.manifest import (
    ManifestStore,
    ManifestTooLarge,
    ManifestUnreadable,
    Status,
    Transition,
)
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
        extractor_block=save_llm_block(llm.base_url, API_KEY, max_retries=1),
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


def _echoing_usage_answer() -> dict[str, object]:
    """A 200 chat completion whose usage echoes the key: the SDK hands it over unchecked."""
    message = {"role": "assistant", "content": "{}", "refusal": None}
    return {
        "id": "chatcmpl-echo",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": API_KEY, "completion_tokens": 1, "total_tokens": 1},
    }


async def _run_haystacks(run_id: uuid.UUID, want_in_logs: tuple[str, ...]) -> dict[str, str]:
    """Run logs, artifacts and the flow run as the API serves them, once the logs that
    must be there have arrived (run logs are eventually consistent)."""
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()
    found: dict[str, str] = {}

    async def logs_arrived() -> bool:
        async with get_client() as client:
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
        found["run logs"] = "\n".join(log.message for log in logs)
        return all(word in found["run logs"] for word in want_in_logs)

    deadline = time.monotonic() + 30
    while not await logs_arrived():
        assert time.monotonic() < deadline, f"run logs incomplete after 30 s: {found}"
        await asyncio.sleep(0.5)
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        flow_run = await client.read_flow_run(run_id)
    found["artifacts"] = "\n".join(f"{a.key} {a.description} {a.data}" for a in artifacts)
    found["flow run"] = flow_run.model_dump_json()
    found["state message"] = (flow_run.state.message or "") if flow_run.state else ""
    return found


@pytest.mark.e2e
async def test_a_key_the_endpoint_echoes_is_masked_everywhere(
    s3: S3Store,
    llm: LLMServerHandle,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Issue 11 item 8: the endpoint echoes the key in a 401 body, a 500 body, a header
    and a malformed answer that makes the response handling raise; the key is nowhere."""
    from prefect.client.orchestration import get_client

    prefix = unique("echo") + "/"
    listed = sorted(upload(s3, prefix, good_invoices(5, seed=73)))
    unauthorized, broken, malformed = listed[0], listed[1], listed[2]
    params = flow_params(
        prefix,
        await create_lock(unique("lock")),
        extractor_block=save_llm_block(llm.base_url, API_KEY, max_retries=1),
    )
    llm.reset()
    echo = {"x-request-id": API_KEY}  # the SDK logs x-request-id at debug level
    llm.configure(response_headers=echo)
    llm.set_faults(
        [
            {
                "match": unauthorized,
                "status": 401,
                "times": -1,
                "message": f"Incorrect API key provided: {API_KEY}",
                "headers": echo,
            },
            {
                "match": broken,
                "status": 500,
                "times": -1,
                "message": f"upstream said: Authorization: Bearer {API_KEY}",
                "headers": echo,
            },
            {"match": malformed, "status": 200, "times": -1, "body": _echoing_usage_answer()},
        ]
    )
    caplog.set_level(logging.DEBUG)  # every logger in this process, the SDKs' included
    run_id = await create_flow_run(params)
    async with get_client() as client:
        flow_run = await client.read_flow_run(run_id)
    try:
        with pytest.raises(Exception, match="3 of 5 invoices failed"):
            await run_flow_by_engine(flow_run)
    finally:
        llm.set_faults([])
        llm.configure(response_headers={})

    entries = manifest_entries(s3, params["manifest_key"])
    assert entries[unauthorized]["error_kind"] == "auth"
    assert entries[broken]["error_kind"] == "server_error"
    assert entries[malformed]["status"] == "failed"
    assert "[REDACTED]" in entries[unauthorized]["error_message"]  # masked, not dropped
    haystacks = await _run_haystacks(run_id, ("auth", "server_error"))
    captured = capfd.readouterr()
    haystacks |= {
        "process logs": caplog.text,
        "stdout": captured.out,
        "stderr": captured.err,
        "manifest": s3.get(params["manifest_key"]).body.decode(),
    }
    for key in list_keys(s3, params["results_prefix"]):
        haystacks[key] = s3.get(key).body.decode()

    # The searches are real: the echoes happened and the SDK logged the header.
    assert "x-request-id" in caplog.text.lower() or "request_id" in caplog.text
    assert "[REDACTED]" in caplog.text and "[REDACTED]" in haystacks["run logs"]
    assert len(list_keys(s3, params["results_prefix"])) == 2  # the 2 that were done
    needles = (API_KEY, API_KEY.removeprefix("sk-secret-"), API_KEY[-16:])
    leaks = {name for name, text in haystacks.items() if any(n in text for n in needles)}
    assert not leaks, f"the echoed API key leaked into: {sorted(leaks)}"


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
        extractor_block=save_llm_block(llm.base_url, API_KEY),
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
    # Refused before it is downloaded; the run stops with the rebuild command (core's
    # ManifestUnreadable) instead of a bare ValueError.
    with pytest.raises(ManifestUnreadable, match="over the 1000 limit"):
        small.read_sync()


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


def test_the_redactor_masks_messages_arguments_and_tracebacks_of_sdk_exceptions() -> None:
    import httpx
    import openai

    from invoiceflow.redact import MASK, RedactingFilter, Redactor

    redactor = Redactor([API_KEY, "short", None])
    body = {"error": {"message": f"Incorrect API key provided: {API_KEY}", "param": API_KEY}}
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(401, json=body, request=request)
    sdk_error = openai.AuthenticationError("Error code: 401", response=response, body=body)
    try:
        try:
            raise sdk_error
        except openai.APIError as exc:
            raise RuntimeError(f"wrapped {exc.body}") from exc
    except RuntimeError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "call failed with %s", (API_KEY,), sys.exc_info()
        )
    assert API_KEY in logging.Formatter().format(logging.makeLogRecord(record.__dict__))
    assert RedactingFilter(redactor).filter(record) is True  # masked, never dropped
    rendered = logging.Formatter().format(record)
    assert API_KEY not in rendered and rendered.count(MASK) >= 3
    assert "AuthenticationError" in rendered  # the traceback is still there
    assert redactor.redact("short and sweet") == "short and sweet"  # too short to be a key


def test_secrets_are_found_in_every_block_a_run_loads() -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
    from prefect_aws import AwsCredentials
    from pydantic import SecretStr

    from blocks.extractor import ExtractorBlock
    from flows.redaction import secrets_of

    credentials = AwsCredentials(
        aws_access_key_id="AKIAEXAMPLE",
        aws_secret_access_key=SecretStr("aws-secret-access-key"),
        aws_session_token="aws-session-token",
    )
    extractor = ExtractorBlock(
        kind="bedrock", api_key=SecretStr(API_KEY), aws_credentials=credentials
    )
    assert set(secrets_of(extractor)) >= {API_KEY, "aws-secret-access-key", "aws-session-token"}
    assert "http" not in " ".join(secrets_of(extractor))  # base URLs are not secrets
    hook = "https://hooks.example.com/services/T000/B000/XXXXSECRET"
    assert hook in set(secrets_of(SlackWebhook(url=SecretStr(hook))))
    custom = CustomWebhookNotificationBlock(name="x", url=hook, secrets={"token": "tok-123456"})
    assert set(secrets_of(custom)) >= {hook, "tok-123456"}
