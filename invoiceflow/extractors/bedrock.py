"""LLM extractor for AWS Bedrock's Converse API, through boto3.

Structured output is tool use: the model must call one tool whose input schema is the
invoice schema. boto3 is blocking, so calls run on a thread pool of this extractor's
own (sized for the configured concurrency; the default executor has only a handful of
threads) and the event loop stays free.

Retries are botocore's (``Config(retries={"mode": "standard" | "adaptive", ...})``):
throttling, 5xx, timeouts and connection errors are retried with exponential backoff
and jitter; ``adaptive`` also rate-limits the client after throttling. What is left
maps onto the same `ExtractionError` kinds as the OpenAI extractor (plus
``model_error`` for Bedrock's ModelErrorException, which is not retried).

Imports nothing from Prefect.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.extractors.limits import Limiter, Unlimited
from invoiceflow.extractors.llm import (
    LLM_SCHEMA,
    SYSTEM_PROMPT,
    VISION_PROMPT,
    PageImage,
    TokenPrice,
    VisionMode,
    budgeted_input,
    converse,
    count_attempt,
    estimate_tokens,
    repair_message,
    user_message,
)
from invoiceflow.schema import Invoice, Usage

log = logging.getLogger(__name__)

TOOL_NAME: Final = "record_invoice"
BEDROCK_SYSTEM_PROMPT: Final = (
    f"{SYSTEM_PROMPT} Record the fields by calling the {TOOL_NAME} tool exactly once."
)
TOOL_CONFIG: Final[dict[str, Any]] = {
    "tools": [
        {
            "toolSpec": {
                "name": TOOL_NAME,
                "description": "Record the structured fields of the invoice.",
                "inputSchema": {"json": LLM_SCHEMA},
            }
        }
    ],
    "toolChoice": {"tool": {"name": TOOL_NAME}},
}
CACHE_POINT: Final[dict[str, Any]] = {"cachePoint": {"type": "default"}}
# requestMetadata values allow only these characters; others are escaped "=XX".
_METADATA_SAFE: Final = re.compile(r"[A-Za-z0-9 :_@$#/+,\-.]")
METADATA_KEY: Final = "invoice_key"
_THROTTLED: Final = frozenset({"ThrottlingException", "TooManyRequestsException"})
_UNAVAILABLE: Final = frozenset(
    {"InternalServerException", "ServiceUnavailableException", "ModelNotReadyException"}
)
_AUTH: Final = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
    }
)
_CONTEXT_WORDS: Final = ("too long", "context length", "context window", "too many tokens")
# Converse takes at most 20 images of at most 3.75 MB each.
MAX_IMAGES: Final = 20
MAX_IMAGE_BYTES: Final = 3_750_000


def metadata_value(key: str) -> str:
    """``key`` in the character set Bedrock's requestMetadata accepts (reversible)."""
    out = []
    for ch in key:
        if _METADATA_SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"={byte:02X}" for byte in ch.encode())
    return "".join(out)[:256]


def map_bedrock_error(exc: Exception) -> ExtractionError:
    """Classify what botocore raised after its own retries."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"Bedrock answered {status} {code}: {message}"
        if code in _THROTTLED or status == 429:
            return ExtractionError("rate_limited", detail, transient=True)
        if code == "ModelTimeoutException" or status == 408:
            return ExtractionError("timeout", detail, transient=True)
        if code in _UNAVAILABLE or status >= 500:
            return ExtractionError("server_error", detail, transient=True)
        if code in _AUTH or status in (401, 403):
            return ExtractionError("auth", detail, transient=False)
        if code == "ModelErrorException":
            return ExtractionError("model_error", detail, transient=False)
        if any(word in message.lower() for word in _CONTEXT_WORDS):
            return ExtractionError("context_too_long", detail, transient=False)
        return ExtractionError("bad_request", detail, transient=False)
    # Order matters: ConnectTimeoutError is an EndpointConnectionError.
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError):
        return ExtractionError("timeout", f"Bedrock request timed out: {exc}", transient=True)
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
        return ExtractionError("connection", f"Bedrock connection failed: {exc}", transient=True)
    if isinstance(exc, NoCredentialsError):
        return ExtractionError("auth", f"no AWS credentials: {exc}", transient=False)
    return ExtractionError("connection", f"Bedrock call failed: {exc}", transient=True)


class BedrockExtractor:
    """`Extractor` on the Bedrock Converse API with tool use for structured output.

    ``client`` is a boto3 ``bedrock-runtime`` client; its botocore ``Config`` carries
    the retry mode, timeouts and connection pool (see `blocks.extractor`).
    """

    name = "bedrock"

    def __init__(
        self,
        *,
        client: Any,
        model_id: str,
        max_chars: int = 48_000,
        max_pages: int | None = None,
        max_output_tokens: int = 2_000,
        temperature: float = 0.0,
        repair_attempts: int = 1,
        max_total_s: float | None = None,
        price: TokenPrice | None = None,
        price_currency: str = "USD",
        limiter: Limiter | None = None,
        max_workers: int = 64,
        vision: VisionMode = "auto",
        max_images: int = 8,
        max_image_pixels: int = 2_500_000,
    ) -> None:
        if repair_attempts < 0:
            raise ValueError("repair_attempts must be >= 0")
        self._client = client
        self.model = model_id
        self.max_chars = max_chars
        self.max_pages = max_pages
        self._max_output_tokens = max_output_tokens
        self._temperature = temperature
        self.repair_attempts = repair_attempts
        self._max_total_s = max_total_s
        self.price = price
        self.price_currency = price_currency
        self.limiter: Limiter = limiter or Unlimited()
        self.vision: VisionMode = vision
        self.max_images = min(max_images, MAX_IMAGES)
        self.max_image_pixels = max_image_pixels
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="bedrock")
        client.meta.events.register("before-send.bedrock-runtime.Converse", count_attempt)

    def __repr__(self) -> str:
        return f"BedrockExtractor(model_id={self.model!r})"

    async def extract(self, text: str) -> Invoice:
        return (await self.extract_document(text)).invoice

    async def extract_document(
        self,
        text: str,
        *,
        pages: int | None = None,
        invoice_key: str | None = None,
        images: Sequence[bytes] = (),
    ) -> Extraction:
        """Extract one invoice; ``images`` (PNG pages) go as Converse ``image`` blocks."""
        sent, truncation, pictures, notes = budgeted_input(
            self, text, images, max_image_bytes=MAX_IMAGE_BYTES
        )
        # Images before the text, as Anthropic's models on Bedrock read them best.
        content = [*(_image_block(p) for p in pictures), {"text": user_message(sent, len(sent))}]
        chat = _BedrockChat(self, content, invoice_key, sum(p.tokens for p in pictures))
        return await converse(
            self, chat, truncation=truncation, invoice_key=invoice_key, notes=notes
        )

    async def _converse(
        self, messages: list[dict[str, Any]], invoice_key: str | None, image_tokens: int = 0
    ) -> Any:
        # The static prompt, then a cache point: Bedrock caches everything before it
        # (tools and system) and bills it at the cache-read price on later calls.
        system: list[dict[str, Any]] = [{"text": BEDROCK_SYSTEM_PROMPT}, CACHE_POINT]
        if image_tokens:
            system.append({"text": VISION_PROMPT})
        request: dict[str, Any] = {
            "modelId": self.model,
            "system": system,
            "messages": messages,
            "toolConfig": TOOL_CONFIG,
            "inferenceConfig": {
                "maxTokens": self._max_output_tokens,
                "temperature": self._temperature,
            },
        }
        if invoice_key:
            request["requestMetadata"] = {METADATA_KEY: metadata_value(invoice_key)}
        texts = [block.get("text", "") for message in messages for block in message["content"]]
        texts += [block.get("text", "") for block in system]
        estimate = estimate_tokens(*texts) + image_tokens + self._max_output_tokens
        loop = asyncio.get_running_loop()
        # copy_context: the attempt counter must be visible in the worker thread.
        call = functools.partial(
            contextvars.copy_context().run, functools.partial(self._client.converse, **request)
        )
        async with self.limiter.call(tokens=estimate) as permit:
            try:
                async with asyncio.timeout(self._max_total_s):
                    response = await loop.run_in_executor(self._executor, call)
            except TimeoutError as exc:
                raise ExtractionError(
                    "timeout",
                    f"Bedrock call (retries included) exceeded {self._max_total_s} s",
                    transient=True,
                ) from exc
            except (ClientError, BotoCoreError) as exc:
                raise map_bedrock_error(exc) from exc
            permit.record(_usage(response).total_tokens)
        return response

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> BedrockExtractor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _usage(response: Any) -> Usage:
    """Converse usage in our convention: Bedrock's ``inputTokens`` leaves out the tokens
    read from or written to the prompt cache, our ``prompt_tokens`` includes them."""
    reported = response.get("usage") or {}
    read = int(reported.get("cacheReadInputTokens", 0) or 0)
    written = int(reported.get("cacheWriteInputTokens", 0) or 0)
    return Usage(
        prompt_tokens=int(reported.get("inputTokens", 0)) + read + written,
        completion_tokens=int(reported.get("outputTokens", 0)),
        cached_tokens=read,
        cache_write_tokens=written,
    )


def _answer(response: Any) -> tuple[dict[str, Any] | str, dict[str, Any] | None]:
    """(tool input or text content, the toolUse block) of a Converse response."""
    stop = response.get("stopReason")
    content = (response.get("output") or {}).get("message", {}).get("content") or []
    text = "".join(block.get("text", "") for block in content if isinstance(block, dict))
    if stop in ("guardrail_intervened", "content_filtered"):
        raise ExtractionError(
            "refusal", f"Bedrock stopped the answer ({stop}): {text[:200]}", transient=False
        )
    if stop == "max_tokens":
        raise ExtractionError("invalid_json", "answer cut off at the token limit", transient=False)
    for block in content:
        tool_use = block.get("toolUse") if isinstance(block, dict) else None
        if tool_use and tool_use.get("name") == TOOL_NAME:
            tool_input = tool_use.get("input")
            if isinstance(tool_input, str):  # some models send the input as a JSON string
                return tool_input, tool_use
            if isinstance(tool_input, dict):
                return tool_input, tool_use
            raise ExtractionError(
                "schema_invalid", "tool input is not a JSON object", transient=False
            )
    if text:
        return text, None  # answered in prose instead of calling the tool
    raise ExtractionError("invalid_json", "Bedrock answered with no content", transient=False)


class _BedrockChat:
    """One invoice's Converse messages: the repair turn answers the tool call (or the
    prose) with the validation error."""

    strict = False  # tool input is not schema-enforced; missing keys are left null

    def __init__(
        self,
        extractor: BedrockExtractor,
        content: list[dict[str, Any]],
        invoice_key: str | None,
        image_tokens: int = 0,
    ) -> None:
        self._extractor = extractor
        self._invoice_key = invoice_key
        self._image_tokens = image_tokens
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        self._response: Any = None
        self._tool_use: dict[str, Any] | None = None

    async def ask(self) -> tuple[dict[str, Any] | str, Usage]:
        self._response = await self._extractor._converse(
            self.messages, self._invoice_key, self._image_tokens
        )
        usage = _usage(self._response)
        try:
            answer, self._tool_use = _answer(self._response)
        except ExtractionError as exc:
            exc.usage = usage  # answered and billed, but unusable
            raise
        return answer, usage

    def add_repair(self, error: ExtractionError) -> None:
        self.messages += _repair_turns(self._response, self._tool_use, error)


def _image_block(page: PageImage) -> dict[str, Any]:
    return {"image": {"format": "png", "source": {"bytes": page.png}}}


def _repair_turns(
    response: Any, tool_use: dict[str, Any] | None, error: ExtractionError
) -> list[dict[str, Any]]:
    assistant = (response.get("output") or {}).get("message") or {"role": "assistant"}
    turns: list[dict[str, Any]] = [
        {"role": "assistant", "content": assistant.get("content") or [{"text": "(no answer)"}]}
    ]
    if tool_use is not None:
        turns.append(
            {
                "role": "user",
                "content": [
                    {
                        "toolResult": {
                            "toolUseId": tool_use.get("toolUseId", TOOL_NAME),
                            "content": [{"text": repair_message(error)}],
                            "status": "error",
                        }
                    }
                ],
            }
        )
    else:
        turns.append({"role": "user", "content": [{"text": repair_message(error)}]})
    return turns
