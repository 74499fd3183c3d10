"""Vision: page images to OpenAI-compatible and Bedrock models, checked by the loopback
servers (count, size, media type), bounded in pages and pixels, billed like text."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import boto3
import pytest
from botocore.config import Config
from PIL import Image

from devtools.bedrock_server import BedrockServerHandle, running_bedrock_server
from devtools.llm_server import FALLBACK_ANSWER, LLMServerHandle, running_llm_server
from invoiceflow.extractors import ExtractionError
from invoiceflow.extractors.bedrock import BedrockExtractor
from invoiceflow.extractors.llm import TokenPrice
from invoiceflow.extractors.openai import OpenAIExtractor

pytestmark = pytest.mark.llm

API_KEY = "sk-vision-test"
ACCESS_KEY = "AKIAVISIONTEST"
ANSWER: dict[str, Any] = {**FALLBACK_ANSWER, "invoice_number": "SCAN-7", "currency": "EUR"}
PRICE = TokenPrice(input_per_million=Decimal("0.15"), output_per_million=Decimal("0.60"))


def png(width: int, height: int, shade: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 128)).save(out, format="PNG")
    return out.getvalue()


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key=API_KEY, answers={"*": ANSWER}) as handle:
        yield handle


@pytest.fixture(scope="module")
def bedrock() -> Iterator[BedrockServerHandle]:
    with running_bedrock_server(api_key=ACCESS_KEY, answers={"*": ANSWER}) as handle:
        yield handle


def openai_extractor(llm: LLMServerHandle, **settings: Any) -> OpenAIExtractor:
    llm.reset()
    return OpenAIExtractor(
        base_url=llm.base_url, api_key=API_KEY, max_retries=0, price=PRICE, **settings
    )


def bedrock_extractor(server: BedrockServerHandle, **settings: Any) -> BedrockExtractor:
    server.reset()
    client = boto3.client(
        "bedrock-runtime",
        region_name="eu-central-1",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key="loopback-secret",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    return BedrockExtractor(client=client, model_id="m", price=PRICE, **settings)


async def test_openai_sends_pages_as_png_data_urls_and_bills_their_tokens(
    llm: LLMServerHandle,
) -> None:
    pages = [png(800, 1100, 10), png(800, 1100, 200)]
    async with openai_extractor(llm) as ex:
        extraction = await ex.extract_document("", invoice_key="scan.pdf", images=pages)
        text_only = await ex.extract_document("", invoice_key="text.pdf")

    received = llm.images("scan.pdf")
    assert [(i["media_type"], i["width"], i["height"]) for i in received] == [
        ("image/png", 800, 1100)
    ] * 2
    assert [i["sha1"] for i in received] == [sha1(p) for p in pages]  # sent unchanged
    assert llm.images("text.pdf") == []
    assert extraction.invoice.invoice_number == "SCAN-7"
    # 800x1100 is 2x3 tiles of 512 px: 85 + 170 * 6 = 1105 tokens a page.
    extra = extraction.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert extra >= 2 * 1105
    assert extraction.cost is not None and extraction.cost > (text_only.cost or 0)


async def test_pages_and_pixels_per_call_are_bounded(llm: LLMServerHandle) -> None:
    pages = [png(300, 400, shade) for shade in (1, 2, 3, 4, 5)]
    big = png(3000, 3000, 9)
    async with openai_extractor(llm, max_images=3, max_image_pixels=1_000_000) as ex:
        few = await ex.extract_document("", invoice_key="many.pdf", images=pages)
        shrunk = await ex.extract_document("", invoice_key="big.pdf", images=[big])

    # The first pages and the last, like the text budget.
    expected = [sha1(p) for p in (pages[0], pages[1], pages[4])]
    assert [i["sha1"] for i in llm.images("many.pdf")] == expected
    assert any("2 of 5 page images not sent" in note for note in few.notes)
    (received,) = llm.images("big.pdf")
    assert received["width"] * received["height"] <= 1_000_000 and received["width"] >= 900
    assert any("downscaled from 3000x3000" in note for note in shrunk.notes)


async def test_vision_never_sends_no_images_and_non_png_pages_are_refused(
    llm: LLMServerHandle,
) -> None:
    async with openai_extractor(llm, vision="never") as ex:
        await ex.extract_document("Invoice SCAN-7", invoice_key="never.pdf", images=[png(50, 50)])
    assert llm.images() == [] and llm.stats()["total"] == 1

    jpeg = io.BytesIO()
    Image.new("RGB", (50, 50)).save(jpeg, format="JPEG")
    async with openai_extractor(llm) as ex:
        with pytest.raises(ExtractionError) as refused:
            await ex.extract_document("", invoice_key="jpeg.pdf", images=[jpeg.getvalue()])
    assert (refused.value.kind, refused.value.transient) == ("bad_image", False)
    assert llm.stats()["total"] == 0  # refused before any call


async def test_the_loopback_server_checks_image_count_and_media_type(
    llm: LLMServerHandle,
) -> None:
    async with openai_extractor(llm) as ex:
        llm.configure(max_images=1)
        try:
            with pytest.raises(ExtractionError) as failure:
                await ex.extract_document("", invoice_key="two.pdf", images=[png(40, 40)] * 2)
        finally:
            llm.configure(max_images=0)
    assert failure.value.kind == "bad_request" and "too many images" in str(failure.value)
    assert llm.stats()["by_status"] == {"400": 1}

    import httpx

    gif_as_png = "data:image/png;base64,R0lGODlhAQABAAAAACw="
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": gif_as_png}}]}
        ],
    }
    headers = {"authorization": f"Bearer {API_KEY}"}
    answer = httpx.post(f"{llm.base_url}/chat/completions", json=body, headers=headers)
    assert answer.status_code == 400 and "declared image/png" in answer.text


async def test_bedrock_sends_pages_as_image_blocks(bedrock: BedrockServerHandle) -> None:
    pages = [png(600, 800, 30), png(600, 800, 60), png(600, 800, 90)]
    ex = bedrock_extractor(bedrock, max_images=2)
    try:
        extraction = await ex.extract_document("", invoice_key="scan.pdf", images=pages)
        text_only = await ex.extract_document("", invoice_key="text.pdf")
    finally:
        await ex.aclose()

    received = bedrock.images("scan.pdf")
    assert [i["sha1"] for i in received] == [sha1(pages[0]), sha1(pages[2])]
    assert {(i["media_type"], i["width"], i["height"]) for i in received} == {
        ("image/png", 600, 800)
    }
    assert extraction.invoice.invoice_number == "SCAN-7"
    assert extraction.usage.prompt_tokens - text_only.usage.prompt_tokens >= 2 * 85
    assert extraction.cost is not None and extraction.cost > (text_only.cost or 0)


async def test_bedrock_server_refuses_an_oversized_image(bedrock: BedrockServerHandle) -> None:
    noisy = Image.effect_noise((1400, 1400), 100).convert("RGB")
    out = io.BytesIO()
    noisy.save(out, format="PNG")
    assert len(out.getvalue()) > 3_750_000 or pytest.skip("noise compressed too well")
    bedrock.reset()
    client = bedrock_extractor(bedrock)._client
    request = {
        "modelId": "m",
        "messages": [
            {
                "role": "user",
                "content": [{"image": {"format": "png", "source": {"bytes": out.getvalue()}}}],
            }
        ],
    }
    with pytest.raises(client.exceptions.ValidationException, match="3750000 limit"):
        client.converse(**request)
    # The extractor itself shrinks such a page under Converse's limit before sending.
    ex = bedrock_extractor(bedrock, max_image_pixels=4_000_000)
    try:
        extraction = await ex.extract_document("", invoice_key="noisy.pdf", images=[out.getvalue()])
    finally:
        await ex.aclose()
    (received,) = bedrock.images("noisy.pdf")
    assert received["bytes"] <= 3_750_000
    assert any("downscaled" in note for note in extraction.notes)
