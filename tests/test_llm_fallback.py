"""OpenAI-compatible extraction beyond the happy path, on the loopback server:
structured-output fallback, the repair turn, rate-limit headers, the total time bound,
error classification, usage and cost."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from devtools.llm_server import FALLBACK_ANSWER, LLMServerHandle, running_llm_server
from invoiceflow.extractors import ExtractionError
from invoiceflow.extractors.llm import REPAIR_PREFIX, SYSTEM_PROMPT, TokenPrice, user_message
from invoiceflow.extractors.openai import OpenAIExtractor, parse_reset

pytestmark = pytest.mark.llm

API_KEY = "sk-fallback-test"
TEXT = "ACME GmbH\nInvoice ACME-42\nDate 2024-03-01\nNet 1.000,00\nVAT 190,00\nTotal EUR 1.190,00"
GOOD: dict[str, Any] = {
    **FALLBACK_ANSWER,
    "invoice_number": "ACME-42",
    "invoice_date": "2024-03-01",
    "vendor_name": "ACME GmbH",
    "currency": "EUR",
    "subtotal": "1000.00",
    "tax_total": "190.00",
    "total": "1190.00",
}


@pytest.fixture(scope="module")
def llm_server() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


@pytest.fixture
def server(llm_server: LLMServerHandle) -> LLMServerHandle:
    llm_server.reset()
    return llm_server


def extractor(server: LLMServerHandle, **overrides: Any) -> OpenAIExtractor:
    options: dict[str, Any] = {
        "base_url": server.base_url,
        "api_key": API_KEY,
        "model": "test-model",
        "timeout_s": 5.0,
        "max_retries": 2,
        **overrides,
    }
    return OpenAIExtractor(**options)


# --- structured output fallback ----------------------------------------------------------


async def test_server_without_json_schema_gets_json_mode_and_it_sticks(
    server: LLMServerHandle,
) -> None:
    server.configure(response_formats=["json_object"])
    server.set_answers({"*": GOOD})
    async with extractor(server) as ex:
        first = await ex.extract_document(TEXT, invoice_key="a")
        second = await ex.extract_document(TEXT, invoice_key="b")

    assert first.invoice.total == second.invoice.total == Decimal("1190.00")
    assert ex.mode == "json_object"
    stats = server.stats()
    # One rejected json_schema request, then JSON mode only, also for the next invoice.
    assert stats["by_format"] == {"json_schema": 1, "json_object": 2}
    assert stats["by_status"] == {"400": 1, "200": 2}
    assert (first.attempts, second.attempts) == (2, 1)


async def test_server_without_any_response_format_gets_a_plain_prompt(
    server: LLMServerHandle,
) -> None:
    server.configure(response_formats=["text"])
    # A chatty model: fenced JSON, null keys left out.
    server.set_answers({"*": "```json\n" + json.dumps({"invoice_number": "ACME-42"}) + "\n```"})
    async with extractor(server) as ex:
        extraction = await ex.extract_document(TEXT)

    assert extraction.invoice.invoice_number == "ACME-42"
    assert extraction.invoice.total is None
    assert ex.mode == "prompt"
    assert server.stats()["by_format"] == {"json_schema": 1, "json_object": 1, "none": 1}


async def test_pinned_json_schema_does_not_step_down(server: LLMServerHandle) -> None:
    server.configure(response_formats=["json_object"])
    async with extractor(server, structured_output="json_schema") as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)

    assert (caught.value.kind, caught.value.transient) == ("bad_request", False)
    assert server.stats()["total"] == 1


# --- repair ------------------------------------------------------------------------------


async def test_invalid_answer_is_repaired_once(server: LLMServerHandle) -> None:
    bad = {**GOOD, "total": "about 1190 euros"}
    server.set_answers({REPAIR_PREFIX: GOOD, "*": bad})
    async with extractor(server) as ex:
        extraction = await ex.extract_document(TEXT, invoice_key="fix-me")

    assert extraction.invoice.total == Decimal("1190.00")
    assert extraction.repaired
    assert extraction.attempts == 2
    assert server.stats()["by_key"] == {"fix-me": 2}
    # Usage is both calls: the second carries the first answer and the repair turn.
    first_prompt = len(SYSTEM_PROMPT) + len(user_message(TEXT, len(TEXT)))
    assert extraction.usage.prompt_tokens > 2 * math.ceil(first_prompt / 4)
    assert extraction.usage.completion_tokens == math.ceil(len(json.dumps(bad)) / 4) + math.ceil(
        len(json.dumps(GOOD)) / 4
    )


async def test_unrepairable_answer_fails_permanently_after_one_repair(
    server: LLMServerHandle,
) -> None:
    server.set_answers({"*": {**GOOD, "line_items": [{"description": "x"}]}})
    async with extractor(server, price=TokenPrice(input_per_million=1, output_per_million=2)) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract_document(TEXT)

    error = caught.value
    assert (error.kind, error.transient, error.attempts) == ("schema_invalid", False, 2)
    assert server.stats()["total"] == 2
    # A failed invoice still reports what it cost.
    assert error.usage.total_tokens > 0
    assert error.cost == TokenPrice(input_per_million=1, output_per_million=2).cost(error.usage)


async def test_no_repair_when_disabled(server: LLMServerHandle) -> None:
    server.set_answers({"*": "not json"})
    async with extractor(server, repair_attempts=0) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)
    assert caught.value.kind == "invalid_json"
    assert server.stats()["total"] == 1


async def test_locale_numbers_and_symbols_are_normalized(server: LLMServerHandle) -> None:
    server.set_answers(
        {"*": {**GOOD, "subtotal": "1.000,00", "total": "EUR 1 190,00", "currency": "€"}}
    )
    async with extractor(server) as ex:
        extraction = await ex.extract_document(TEXT)

    invoice = extraction.invoice
    assert (invoice.subtotal, invoice.total, invoice.currency) == (
        Decimal("1000.00"),
        Decimal("1190.00"),
        "EUR",
    )
    assert extraction.attempts == 1


async def test_ambiguous_dollar_is_left_empty_with_a_note(server: LLMServerHandle) -> None:
    server.set_answers({"*": {**GOOD, "currency": "$"}})
    async with extractor(server) as ex:
        extraction = await ex.extract_document(TEXT)
    assert extraction.invoice.currency is None
    assert any("ambiguous" in note for note in extraction.notes)


# --- retries: headers, bounds, classification --------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1.5s", 1.5), ("0.5", 0.5), ("1h2m", 3720.0)],
)
def test_parse_reset(value: str, seconds: float) -> None:
    assert parse_reset(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "soon", "1x", "s1"])
def test_parse_reset_rejects_garbage(value: str) -> None:
    assert parse_reset(value) is None


async def test_429_waits_for_x_ratelimit_reset(server: LLMServerHandle) -> None:
    server.set_answers({"*": GOOD})
    server.set_faults(
        [{"status": 429, "times": 1, "headers": {"x-ratelimit-reset-requests": "2.5s"}}]
    )
    async with extractor(server, max_retries=1) as ex:
        started = time.monotonic()
        extraction = await ex.extract_document(TEXT)
        elapsed = time.monotonic() - started

    assert extraction.attempts == 2
    # The SDK's own first backoff is at most 0.5 s; only the header explains 2.5 s.
    assert elapsed >= 2.4
    assert server.stats()["by_status"] == {"429": 1, "200": 1}


async def test_retry_after_beats_the_reset_header(server: LLMServerHandle) -> None:
    server.set_answers({"*": GOOD})
    server.set_faults(
        [
            {
                "status": 429,
                "times": 1,
                "retry_after": "0.01",
                "headers": {"x-ratelimit-reset-requests": "30s"},
            }
        ]
    )
    async with extractor(server, max_retries=1) as ex:
        started = time.monotonic()
        await ex.extract_document(TEXT)
    assert time.monotonic() - started < 20


async def test_total_time_is_bounded_across_retries(server: LLMServerHandle) -> None:
    server.set_faults([{"status": "timeout", "times": -1}])
    async with extractor(server, timeout_s=30, max_retries=5, max_total_s=0.5) as ex:
        started = time.monotonic()
        with pytest.raises(ExtractionError) as caught:
            await ex.extract(TEXT)
        elapsed = time.monotonic() - started

    assert (caught.value.kind, caught.value.transient) == ("timeout", True)
    assert elapsed < 10  # far below 6 attempts x 30 s
    assert server.stats()["total"] == 1


@pytest.mark.parametrize(
    ("fault", "kind", "transient", "requests"),
    [
        ({"status": 429, "retry_after": "0.01"}, "rate_limited", True, 3),
        ({"status": 500, "retry_after": "0.01"}, "server_error", True, 3),
        ({"status": 503, "retry_after": "0.01"}, "server_error", True, 3),
        ({"status": "reset"}, "connection", True, 3),
        ({"status": 400}, "bad_request", False, 1),
        ({"status": 404}, "bad_request", False, 1),
        (
            {"status": 400, "code": "context_length_exceeded", "message": "too many tokens"},
            "context_too_long",
            False,
            1,
        ),
        ({"status": 413}, "context_too_long", False, 1),
        ({"status": 403}, "auth", False, 1),
    ],
)
async def test_classification_and_retry_counts(
    server: LLMServerHandle, fault: dict[str, Any], kind: str, transient: bool, requests: int
) -> None:
    server.set_faults([{**fault, "times": -1}])
    async with extractor(server, max_retries=2) as ex:
        with pytest.raises(ExtractionError) as caught:
            await ex.extract_document(TEXT, invoice_key="k")

    assert (caught.value.kind, caught.value.transient) == (kind, transient)
    assert caught.value.attempts == requests
    assert server.stats()["by_key"] == {"k": requests}


# --- usage and cost ----------------------------------------------------------------------


async def test_usage_and_cost_follow_the_price_table(server: LLMServerHandle) -> None:
    server.set_answers({"*": GOOD})
    price = TokenPrice(input_per_million=Decimal("0.15"), output_per_million=Decimal("0.60"))
    async with extractor(server, price=price, price_currency="USD") as ex:
        extraction = await ex.extract_document(TEXT)

    prompt = math.ceil((len(SYSTEM_PROMPT) + len(user_message(TEXT, len(TEXT)))) / 4)
    completion = math.ceil(len(json.dumps(GOOD)) / 4)
    assert (extraction.usage.prompt_tokens, extraction.usage.completion_tokens) == (
        prompt,
        completion,
    )
    expected = (prompt * Decimal("0.15") + completion * Decimal("0.60")) / 1_000_000
    assert extraction.cost == expected.quantize(Decimal("0.000001"))
    assert extraction.cost_currency == "USD"
    assert (extraction.source, extraction.model) == ("llm", "test-model")


async def test_without_a_price_the_cost_is_unknown_not_zero(server: LLMServerHandle) -> None:
    async with extractor(server) as ex:
        extraction = await ex.extract_document(TEXT)
    assert extraction.usage.total_tokens > 0
    assert extraction.cost is None


async def test_page_budget_is_recorded(server: LLMServerHandle) -> None:
    pages = [f"page {n} ACME-42 line" for n in range(1, 11)]
    text = "\n\f\n".join(pages)
    async with extractor(server, max_pages=3) as ex:
        extraction = await ex.extract_document(text, pages=10)

    truncation = extraction.truncation
    assert truncation is not None
    assert (truncation.pages_total, truncation.pages_sent) == (10, 3)
    assert truncation.chars_total == len(text)
    assert truncation.chars_sent < len(text)
