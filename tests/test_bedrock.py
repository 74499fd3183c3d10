"""BedrockExtractor through real boto3 against the loopback Converse server."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import boto3
import pytest
from botocore.config import Config
from prefect_aws import AwsCredentials
from pydantic import SecretStr

from blocks.extractor import ExtractorBlock
from devtools.bedrock_server import (
    BedrockServerHandle,
    decode_metadata,
    running_bedrock_server,
)
from devtools.llm_server import FALLBACK_ANSWER
from invoiceflow.extractors import ExtractionError
from invoiceflow.extractors.bedrock import (
    BEDROCK_SYSTEM_PROMPT,
    BedrockExtractor,
    metadata_value,
)
from invoiceflow.extractors.limits import ProviderLimiter
from invoiceflow.extractors.llm import REPAIR_PREFIX, TokenPrice, user_message
from invoiceflow.extractors.rules import extract_invoice
from invoiceflow.pdf import parse_pdf
from invoiceflow.samples import generate_invoice, stated_fields
from invoiceflow.schema import Invoice

pytestmark = pytest.mark.llm

ACCESS_KEY = "AKIALOOPBACKTEST"
MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
GOOD: dict[str, Any] = {
    **FALLBACK_ANSWER,
    "invoice_number": "ACME-42",
    "vendor_name": "ACME GmbH",
    "currency": "EUR",
    "total": "1190.00",
}
TEXT = "ACME GmbH\nInvoice ACME-42\nTotal EUR 1.190,00"


@pytest.fixture(scope="module")
def bedrock_server() -> Iterator[BedrockServerHandle]:
    with running_bedrock_server(api_key=ACCESS_KEY) as handle:
        yield handle


@pytest.fixture
def server(bedrock_server: BedrockServerHandle) -> BedrockServerHandle:
    bedrock_server.reset()
    return bedrock_server


def client(
    server: BedrockServerHandle,
    *,
    attempts: int = 3,
    read_timeout: float = 5,
    access_key: str = ACCESS_KEY,
    mode: str = "standard",
) -> Any:
    return boto3.client(
        "bedrock-runtime",
        region_name="eu-central-1",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key="loopback-secret",
        config=Config(
            retries={"mode": mode, "total_max_attempts": attempts},
            read_timeout=read_timeout,
            connect_timeout=2,
            max_pool_connections=32,
        ),
    )


def extractor(server: BedrockServerHandle, **options: Any) -> BedrockExtractor:
    client_options = {
        k: options.pop(k) for k in ("attempts", "read_timeout", "access_key") if k in options
    }
    return BedrockExtractor(client=client(server, **client_options), model_id=MODEL, **options)


async def test_generated_invoice_round_trips_with_usage_and_cost(
    server: BedrockServerHandle,
) -> None:
    pdf, truth = generate_invoice(31)
    text = parse_pdf(pdf).text
    price = TokenPrice(input_per_million=Decimal("0.8"), output_per_million=Decimal("4"))
    async with extractor(server, price=price) as ex:
        extraction = await ex.extract_document(text, invoice_key="in/Rechnung März.pdf")

    # The default answer is the rules extraction of exactly the text that was sent.
    assert stated_fields(extraction.invoice) == truth
    assert (extraction.source, extraction.extractor, extraction.model) == ("llm", "bedrock", MODEL)
    assert extraction.attempts == 1
    sent = user_message(text, len(text))
    answer = json.dumps(extract_invoice(text).model_dump(mode="json"))
    assert extraction.usage.prompt_tokens == math.ceil((len(BEDROCK_SYSTEM_PROMPT) + len(sent)) / 4)
    assert extraction.usage.completion_tokens == math.ceil(len(answer) / 4)
    assert extraction.cost == price.cost(extraction.usage)
    assert server.stats()["by_key"] == {"in/Rechnung März.pdf": 1}


def test_metadata_escaping_round_trips() -> None:
    key = "eingang/Rechnung März 2026 (1)=x.pdf"
    escaped = metadata_value(key)
    assert all(ch.isascii() for ch in escaped)
    assert "(" not in escaped and "ä" not in escaped
    assert decode_metadata(escaped) == key


async def test_throttling_is_retried_by_botocore(server: BedrockServerHandle) -> None:
    server.set_answers({"*": GOOD})
    server.set_faults([{"status": 429, "times": 2}])
    async with extractor(server, attempts=3) as ex:
        extraction = await ex.extract_document(TEXT, invoice_key="t")

    assert extraction.invoice.total == Decimal("1190.00")
    assert extraction.attempts == 3
    assert server.stats()["by_status"] == {"429": 2, "200": 1}


@pytest.mark.parametrize(
    ("fault", "kind", "transient", "requests"),
    [
        ({"status": 429}, "rate_limited", True, 2),
        ({"status": 500}, "server_error", True, 2),
        ({"status": 503}, "server_error", True, 2),
        ({"status": "reset"}, "connection", True, 2),
        ({"status": 400}, "bad_request", False, 1),
        ({"status": 424}, "model_error", False, 1),
        ({"status": 403}, "auth", False, 1),
    ],
)
async def test_classification_and_retry_counts(
    server: BedrockServerHandle, fault: dict[str, Any], kind: str, transient: bool, requests: int
) -> None:
    server.set_faults([{**fault, "times": -1}])
    async with extractor(server, attempts=2) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract_document(TEXT, invoice_key="k")

    assert (caught.value.kind, caught.value.transient) == (kind, transient)
    assert caught.value.attempts == requests
    assert server.stats()["by_key"] == {"k": requests}


async def test_timeout_is_transient(server: BedrockServerHandle) -> None:
    server.set_faults([{"status": "timeout", "times": -1}])
    async with extractor(server, attempts=1, read_timeout=0.5) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)
    assert (caught.value.kind, caught.value.transient) == ("timeout", True)


async def test_wrong_credentials_are_permanent(server: BedrockServerHandle) -> None:
    async with extractor(server, access_key="AKIAWRONG") as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)
    assert (caught.value.kind, caught.value.transient) == ("auth", False)
    assert server.stats()["by_status"] == {"403": 1}


async def test_guardrail_is_a_refusal(server: BedrockServerHandle) -> None:
    server.set_answers(refusals={"ACME": "Sorry, I cannot help with that."})
    async with extractor(server) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)
    assert (caught.value.kind, caught.value.transient) == ("refusal", False)


async def test_malformed_text_answer_is_invalid_json_after_one_repair(
    server: BedrockServerHandle,
) -> None:
    server.set_answers({"*": '{"invoice_number": "ACME-42", '})
    async with extractor(server) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)
    assert (caught.value.kind, caught.value.transient) == ("invalid_json", False)
    assert caught.value.attempts == 2


async def test_wrong_schema_tool_input_is_repaired_through_a_tool_result(
    server: BedrockServerHandle,
) -> None:
    server.set_answers({REPAIR_PREFIX: GOOD, "*": {**GOOD, "total": "a lot", "bank": "DE00"}})
    async with extractor(server) as ex:
        extraction = await ex.extract_document(TEXT, invoice_key="r")

    assert extraction.invoice.total == Decimal("1190.00")
    assert extraction.repaired and extraction.attempts == 2
    assert server.stats()["by_key"] == {"r": 2}


async def test_wrong_schema_is_schema_invalid_when_repair_fails(
    server: BedrockServerHandle,
) -> None:
    server.set_answers({"*": {**GOOD, "currency": "EURO-ISH"}})
    async with extractor(server) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)
    assert (caught.value.kind, caught.value.transient) == ("schema_invalid", False)
    assert server.stats()["total"] == 2


async def test_calls_run_off_the_event_loop_and_concurrently(server: BedrockServerHandle) -> None:
    server.configure(latency_s=0.5)
    ticks = 0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.02)

    async with extractor(server) as ex:
        beat = asyncio.create_task(heartbeat())
        started = time.monotonic()
        results = await asyncio.gather(
            *(ex.extract_document(TEXT, invoice_key=f"c{i}") for i in range(8))
        )
        elapsed = time.monotonic() - started
        stop.set()
        await beat

    assert len(results) == 8
    assert server.stats()["max_in_flight"] == 8
    assert elapsed < 3.0  # serially it would be 4 s
    # A blocked loop would not tick while boto3 waits 0.5 s.
    assert ticks >= 10


async def test_limiter_bounds_bedrock_calls(server: BedrockServerHandle) -> None:
    server.configure(latency_s=0.2)
    limiter = ProviderLimiter(max_in_flight=3)
    async with extractor(server, limiter=limiter) as ex:
        await asyncio.gather(*(ex.extract_document(TEXT, invoice_key=f"l{i}") for i in range(9)))
    assert server.stats()["max_in_flight"] == 3
    assert limiter.stats.calls == 9
    assert limiter.stats.max_in_flight == 3


async def test_block_builds_a_bedrock_extractor_from_aws_credentials(
    server: BedrockServerHandle,
) -> None:
    block = ExtractorBlock(
        kind="bedrock",
        model=MODEL,
        aws_credentials=AwsCredentials(
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SecretStr("loopback-secret"),
            region_name="eu-central-1",
        ),
        endpoint_url=server.endpoint_url,
        max_retries=1,
        prices={MODEL: TokenPrice(input_per_million=1, output_per_million=5)},
    )
    ex = block.build()
    assert isinstance(ex, BedrockExtractor)
    server.set_answers({"*": GOOD})
    server.set_faults([{"status": 503, "times": 1}])
    try:
        extraction = await ex.extract_document(TEXT)
    finally:
        await ex.aclose()
    assert extraction.invoice == Invoice.model_validate(GOOD)
    assert extraction.attempts == 2  # max_retries=1 -> two attempts in botocore
    assert extraction.cost is not None and extraction.cost > 0
    assert "loopback-secret" not in repr(ex)
