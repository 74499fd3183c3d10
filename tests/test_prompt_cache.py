"""Prompt caching (issue 13 section 2): every request starts with the same static part
(instructions, examples; Bedrock marks its end with a cachePoint) and ends with the
document, so from the second request on the provider serves the static part from its
cache; the cached tokens are read from each provider's usage and billed at the cached
price. The loopback servers count what they served from the cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import boto3
import pytest
from botocore.config import Config

from devtools.bedrock_server import BedrockServerHandle, running_bedrock_server
from devtools.llm_server import (
    CACHE_MIN_TOKENS,
    CACHE_STEP_TOKENS,
    CHARS_PER_TOKEN,
    LLMServerHandle,
    PromptCache,
    running_llm_server,
)
from invoiceflow.extractors.bedrock import BEDROCK_SYSTEM_PROMPT, BedrockExtractor
from invoiceflow.extractors.llm import SYSTEM_PROMPT, TokenPrice, schema_instructions
from invoiceflow.extractors.openai import OpenAIExtractor
from invoiceflow.schema import Usage

pytestmark = pytest.mark.llm

API_KEY = "sk-prompt-cache-test"
ACCESS_KEY = "AKIACACHETEST"
PRICE = TokenPrice(
    input_per_million=Decimal("0.15"),
    cached_input_per_million=Decimal("0.075"),
    cache_write_per_million=Decimal("0.1875"),
    output_per_million=Decimal("0.60"),
)
TEXTS = [
    f"Vendor {n} GmbH\nInvoice INV-{n:04d}\nDate 2024-03-0{n}\nTotal EUR {n}00,00"
    for n in range(1, 5)
]


@pytest.fixture(scope="module")
def openai_server() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY) as handle:
        yield handle


@pytest.fixture(scope="module")
def bedrock_server() -> Iterator[BedrockServerHandle]:
    with running_bedrock_server(api_key=ACCESS_KEY) as handle:
        yield handle


def _static_tokens(static_chars: int) -> int:
    """What OpenAI's rule caches of a static prefix: whole 128-token steps from 1,024."""
    step = CACHE_STEP_TOKENS * CHARS_PER_TOKEN
    return static_chars // step * step // CHARS_PER_TOKEN


def test_static_part_is_long_enough_to_be_cached() -> None:
    # Every mode's static part reaches the providers' minimum cacheable prefix.
    for static in (SYSTEM_PROMPT, schema_instructions(), BEDROCK_SYSTEM_PROMPT):
        assert len(static) // CHARS_PER_TOKEN >= CACHE_MIN_TOKENS


def test_loopback_cache_rule() -> None:
    cache = PromptCache()
    static = "s" * (CACHE_MIN_TOKENS * CHARS_PER_TOKEN + 700)
    assert cache.tokens_hit(static + "document one") == 0
    assert cache.tokens_hit(static + "document two") == _static_tokens(len(static))
    assert cache.tokens_hit("x" * 10_000) == 0  # another prefix
    short = "t" * (CACHE_MIN_TOKENS * CHARS_PER_TOKEN - 1)
    cache.tokens_hit(short + "a")
    assert cache.tokens_hit(short + "b") == 0  # below the minimum: never cached
    assert cache.static_hit(static) == (0, len(static) // 4)  # first: written
    assert cache.static_hit(static) == (len(static) // 4, 0)  # then: read


async def test_openai_second_and_later_requests_are_billed_as_cached(
    openai_server: LLMServerHandle,
) -> None:
    openai_server.reset()
    extractor = OpenAIExtractor(
        base_url=openai_server.base_url, api_key=API_KEY, model="m", price=PRICE
    )
    async with extractor:
        extractions = [
            await extractor.extract_document(text, invoice_key=f"in/{n}.pdf")
            for n, text in enumerate(TEXTS)
        ]

    cached = _static_tokens(len(SYSTEM_PROMPT))
    assert cached >= CACHE_MIN_TOKENS
    assert [e.usage.cached_tokens for e in extractions] == [0, cached, cached, cached]
    # Counted at the server: what it served from its cache, per invoice.
    stats = openai_server.stats()
    assert stats["cached_by_key"] == {f"in/{n}.pdf": cached for n in (1, 2, 3)}
    assert stats["cached_tokens"] == 3 * cached
    for extraction in extractions:
        usage = extraction.usage
        uncached = usage.prompt_tokens - usage.cached_tokens
        expected = (
            uncached * PRICE.input_per_million
            + usage.cached_tokens * Decimal("0.075")
            + usage.completion_tokens * PRICE.output_per_million
        ) / 1_000_000
        assert extraction.cost == expected.quantize(Decimal("0.000001"))
    # Caching made the later calls cheaper than the first at the same length.
    assert extractions[1].cost < extractions[0].cost


async def test_openai_repair_turn_reuses_the_conversation_prefix(
    openai_server: LLMServerHandle,
) -> None:
    openai_server.reset()
    openai_server.set_answers({"INV-0001": "not json"})
    extractor = OpenAIExtractor(base_url=openai_server.base_url, api_key=API_KEY, model="m")
    async with extractor:
        extraction = await extractor.extract_document(TEXTS[0], invoice_key="in/repair.pdf")
    assert extraction.repaired
    # The repair request repeats the whole first request before its new turns.
    assert openai_server.stats()["cached_by_key"]["in/repair.pdf"] >= _static_tokens(
        len(SYSTEM_PROMPT)
    )
    assert extraction.usage.cached_tokens == openai_server.stats()["cached_tokens"]


def _bedrock(server: BedrockServerHandle, price: TokenPrice | None = None) -> BedrockExtractor:
    client = boto3.client(
        "bedrock-runtime",
        region_name="eu-central-1",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key="secret",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    return BedrockExtractor(client=client, model_id="anthropic.claude", price=price)


async def test_bedrock_cache_point_written_once_then_read(
    bedrock_server: BedrockServerHandle,
) -> None:
    bedrock_server.reset()
    async with _bedrock(bedrock_server, PRICE) as extractor:
        extractions = [
            await extractor.extract_document(text, invoice_key=f"b/{n}.pdf")
            for n, text in enumerate(TEXTS[:3])
        ]
    static = len(BEDROCK_SYSTEM_PROMPT) // CHARS_PER_TOKEN
    assert [e.usage.cache_write_tokens for e in extractions] == [static, 0, 0]
    assert [e.usage.cached_tokens for e in extractions] == [0, static, static]
    assert bedrock_server.stats()["cached_by_key"] == {"b/1.pdf": static, "b/2.pdf": static}
    first, second = extractions[0], extractions[1]
    # prompt_tokens still counts every prompt token (Bedrock's inputTokens does not).
    assert first.usage.prompt_tokens > static and second.usage.prompt_tokens > static
    assert first.cost == PRICE.cost(first.usage)
    written = first.usage.prompt_tokens - static
    expected = (
        written * PRICE.input_per_million
        + static * Decimal("0.1875")
        + first.usage.completion_tokens * PRICE.output_per_million
    ) / 1_000_000
    assert first.cost == expected.quantize(Decimal("0.000001"))


def test_price_table_defaults_never_assume_a_discount() -> None:
    plain = TokenPrice(input_per_million=Decimal("1"), output_per_million=Decimal("2"))
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=600)
    assert plain.cost(usage) == plain.cost(Usage(prompt_tokens=1000, completion_tokens=100))
    assert plain.cost(usage, batch=True) == plain.cost(usage)
    batch = plain.model_copy(
        update={"batch_input_per_million": Decimal("0.5"), "batch_output_per_million": Decimal(1)}
    )
    assert batch.cost(usage, batch=True) == Decimal("0.000900")  # 400*.5 + 600*1 + 100*1
    assert Usage(prompt_tokens=5, cached_tokens=2) + Usage(prompt_tokens=5, cached_tokens=3) == (
        Usage(prompt_tokens=10, cached_tokens=5)
    )


async def test_bedrock_request_marks_the_end_of_the_static_part() -> None:
    """What the extractor sends (recorded by botocore's before-send hook): the static
    system text, a cachePoint, and the document only in the user turn."""
    sent: list[Any] = []
    client = boto3.client(
        "bedrock-runtime",
        region_name="eu-central-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key="secret",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=0.5),
    )
    client.meta.events.register(
        "before-send.bedrock-runtime.Converse",
        lambda request, **_: sent.append(json.loads(request.body)),
    )
    async with BedrockExtractor(client=client, model_id="m") as extractor:
        with pytest.raises(Exception):  # noqa: B017 - nothing listens on port 9
            await extractor.extract_document(TEXTS[0])
    system = sent[0]["system"]
    assert system[0] == {"text": BEDROCK_SYSTEM_PROMPT}
    assert system[1] == {"cachePoint": {"type": "default"}}
    assert "INV-0001" not in json.dumps(system)
    assert TEXTS[0] in sent[0]["messages"][-1]["content"][-1]["text"]
