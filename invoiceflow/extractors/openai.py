"""LLM extractor for any OpenAI-compatible chat-completions endpoint.

Retries, backoff and ``Retry-After`` are the SDK's job (``max_retries``); a response
hook turns OpenAI's ``x-ratelimit-reset-*`` headers into the ``retry-after-ms`` the SDK
honours when a 429 carries no Retry-After, and ``max_total_s`` bounds the whole call,
backoff included. What is left after that maps onto `ExtractionError` kinds, so the
orchestration layer can decide whether another attempt later is worthwhile:

================  =========  ===================================================
kind              transient  cause
================  =========  ===================================================
rate_limited      yes        429 after the SDK's retries
server_error      yes        5xx (and 409) after the SDK's retries
timeout           yes        request, pool or total-time timeout (also 408)
connection        yes        connect failure, reset, truncated response
auth              no         401 / 403
context_too_long  no         the prompt exceeds the model's context (or 413)
response_too_big  no         the answer exceeds ``max_response_bytes`` (not retried)
bad_request       no         any other 4xx
refusal           no         model refused or the content filter stopped it
invalid_json      no         content missing, cut off, or not JSON (after a repair)
schema_invalid    no         JSON that does not fit the invoice schema (after a repair)
================  =========  ===================================================

Structured output: JSON-schema (strict) first. A server that rejects it (400/422
naming ``response_format``) is asked again in JSON mode with the schema in the prompt,
and one that rejects JSON mode too gets a plain prompt. The step down is remembered
for the extractor's lifetime. Whatever the mode, an answer that fails validation gets
``repair_attempts`` (default one) follow-up turns quoting the error.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final
from urllib.parse import quote

import httpx
import httpx2
import openai
from openai import AsyncOpenAI

from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.extractors.limits import Limiter, Unlimited
from invoiceflow.extractors.llm import (
    LLM_SCHEMA,
    SYSTEM_PROMPT,
    StructuredOutput,
    TokenPrice,
    apply_budget,
    charge,
    estimate_tokens,
    fit_text,
    llm_extraction,
    parse_answer,
    parse_invoice_content,
    repair_message,
    schema_instructions,
    user_message,
)
from invoiceflow.schema import Invoice, Usage

__all__ = [
    "SYSTEM_PROMPT",
    "OpenAIExtractor",
    "Usage",
    "fit_text",
    "parse_invoice_content",
    "user_message",
]

log = logging.getLogger(__name__)

INVOICE_KEY_HEADER = "X-Invoice-Key"
DEFAULT_MODEL = "gpt-4o-mini"
# Roughly 12k tokens: every real invoice we expect fits, a 300-page scan does not.
DEFAULT_MAX_CHARS = 48_000
# Completion budget assumed for rate limiting before the real usage is known.
DEFAULT_OUTPUT_ESTIMATE = 1_000
# An invoice answer is a few KB. Far more means a broken or hostile endpoint, whose
# answer the SDK would otherwise read whole into memory.
DEFAULT_MAX_RESPONSE_BYTES = 2 * 1024 * 1024

_RESPONSE_FORMATS: Final[dict[str, dict[str, Any]]] = {
    "json_schema": {
        "type": "json_schema",
        "json_schema": {"name": "invoice", "strict": True, "schema": LLM_SCHEMA},
    },
    "json_object": {"type": "json_object"},
}
RESPONSE_FORMAT = _RESPONSE_FORMATS["json_schema"]
_LADDER: Final = ("json_schema", "json_object", "prompt")
_FORMAT_WORDS: Final = ("response_format", "json_schema", "json_object", "structured output")
_CONTEXT_WORDS: Final = ("context length", "context_length", "context window", "too many tokens")
_RESET_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)?")

# HTTP requests made for the current extraction; set per call, read by the hook.
_ATTEMPTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "invoiceflow_openai_attempts", default=None
)


def parse_reset(value: str) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: "1s", "6m0s", "20ms", "0.5"."""
    value = value.strip()
    if not value:
        return None
    total, pos = 0.0, 0
    for match in _RESET_PART.finditer(value):
        if match.start() != pos:
            return None
        number, unit = float(match.group(1)), match.group(2) or "s"
        total += number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = match.end()
    return total if pos == len(value) else None


async def _count_request(request: httpx2.Request) -> None:
    counter = _ATTEMPTS.get()
    if counter is not None:
        counter[0] += 1


async def _reset_headers_to_retry_after(response: httpx2.Response) -> None:
    """Let the SDK honour ``x-ratelimit-reset-*`` on a 429 without Retry-After."""
    headers = response.headers
    if response.status_code != 429 or "retry-after" in headers or "retry-after-ms" in headers:
        return
    waits = [
        seconds
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if (raw := headers.get(name)) is not None and (seconds := parse_reset(raw)) is not None
    ]
    if waits:
        headers["retry-after-ms"] = str(int(max(waits) * 1000))


def _unsupported_format(exc: openai.APIStatusError) -> bool:
    return exc.status_code in (400, 422) and any(
        word in str(exc.message).lower() for word in _FORMAT_WORDS
    )


def _map_api_error(exc: openai.APIError) -> ExtractionError:
    # Order matters: APITimeoutError is an APIConnectionError.
    if isinstance(exc, openai.APITimeoutError):
        return ExtractionError("timeout", f"LLM request timed out: {exc}", transient=True)
    if isinstance(exc, openai.APIConnectionError):
        return ExtractionError("connection", f"LLM connection failed: {exc}", transient=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = f"LLM endpoint answered {status}: {exc.message}"
        code = getattr(exc, "code", None)
        if status == 429:
            return ExtractionError("rate_limited", detail, transient=True)
        if status in (401, 403):
            return ExtractionError("auth", detail, transient=False)
        if status == 408:
            return ExtractionError("timeout", detail, transient=True)
        # 409 is the API's "lock timeout": the SDK retries it, so it is not our fault.
        if status >= 500 or status == 409:
            return ExtractionError("server_error", detail, transient=True)
        if (
            status == 413
            or code == "context_length_exceeded"
            or any(w in str(exc.message).lower() for w in _CONTEXT_WORDS)
        ):
            return ExtractionError("context_too_long", detail, transient=False)
        return ExtractionError("bad_request", detail, transient=False)
    # APIResponseValidationError: a 2xx body that is not a chat completion at all.
    return ExtractionError("invalid_json", f"LLM response unusable: {exc}", transient=False)


def _reported_usage(completion: Any) -> Usage:
    """The usage a completion reports. The SDK does not validate answers, so a broken
    one (a gateway's echo, a string for a count) fails here as an unusable response."""
    reported = completion.usage
    if reported is None:
        return Usage()
    try:
        return Usage(
            prompt_tokens=reported.prompt_tokens, completion_tokens=reported.completion_tokens
        )
    except ValueError as exc:
        raise ExtractionError(
            "invalid_json", f"LLM response unusable: {exc}", transient=False
        ) from exc


class ResponseTooLarge(openai.OpenAIError):
    """The answer exceeded the byte limit. An `OpenAIError`, so the SDK does not retry it."""


class _BoundedBody(httpx2.AsyncByteStream):
    """A response body that stops being read once it exceeds `limit` bytes."""

    def __init__(self, inner: httpx2.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._inner:
            received += len(chunk)
            if received > self._limit:
                raise ResponseTooLarge(f"LLM response exceeded {self._limit} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class OpenAIExtractor:
    """`Extractor` backed by chat completions with strict JSON-schema output."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str,
        model: str = DEFAULT_MODEL,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        max_total_s: float | None = None,
        temperature: float = 0.0,
        extra_headers: Mapping[str, str] | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
        max_pages: int | None = None,
        max_connections: int = 64,
        structured_output: StructuredOutput = "auto",
        repair_attempts: int = 1,
        max_output_tokens: int | None = None,
        price: TokenPrice | None = None,
        price_currency: str = "USD",
        limiter: Limiter | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if not api_key:
            # The SDK would fall back to OPENAI_API_KEY from the environment; a blank
            # secret in our configuration must not silently pick up another key.
            raise ValueError("api_key must be a non-empty string")
        if max_chars < 1:
            raise ValueError("max_chars must be positive")
        if repair_attempts < 0:
            raise ValueError("repair_attempts must be >= 0")
        self._base_url = base_url
        self._api_key = api_key
        self.model = model
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._max_total_s = max_total_s
        self._temperature = temperature
        self._extra_headers = dict(extra_headers or {})
        self.max_chars = max_chars
        self.max_pages = max_pages
        self._max_connections = max_connections
        self.mode: str = "json_schema" if structured_output == "auto" else structured_output
        self._may_step_down = structured_output == "auto"
        self.repair_attempts = repair_attempts
        self._max_output_tokens = max_output_tokens
        self.price = price
        self.price_currency = price_currency
        self.limiter: Limiter = limiter or Unlimited()
        self.max_response_bytes = max_response_bytes
        self._client: AsyncOpenAI | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        # Never the key.
        return f"OpenAIExtractor(base_url={self._base_url!r}, model={self.model!r})"

    def _new_client(self) -> AsyncOpenAI:
        limits = httpx.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
        )
        return AsyncOpenAI(
            base_url=self._base_url,
            api_key=self._api_key,
            timeout=self._timeout_s,
            max_retries=self._max_retries,
            default_headers=self._extra_headers or None,
            # The SDK converts httpx.Limits for its own HTTP stack.
            http_client=openai.DefaultAsyncHttpx2Client(
                limits=limits,
                event_hooks={
                    "request": [_count_request],
                    "response": [_reset_headers_to_retry_after, self._bound_body],
                },
            ),
        )

    async def _bound_body(self, response: httpx2.Response) -> None:
        """Response hook: refuse an oversized answer before or while it is read."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_response_bytes:
            await response.aclose()
            raise ResponseTooLarge(
                f"LLM response of {declared} bytes is over the {self.max_response_bytes} limit"
            )
        response.stream = _BoundedBody(response.stream, self.max_response_bytes)  # type: ignore[arg-type]

    def _client_for_running_loop(self) -> AsyncOpenAI:
        # Pooled connections belong to the event loop that opened them; reusing them
        # from another loop (e.g. sync Prefect tasks each running their own loop) fails
        # deep inside the HTTP stack. A new loop therefore gets a new client; the old
        # one cannot be closed from here and is left to the garbage collector.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = self._new_client()
            self._client_loop = loop
        return self._client

    async def extract(self, text: str) -> Invoice:
        return (await self.extract_document(text)).invoice

    async def extract_with_usage(
        self, text: str, *, invoice_key: str | None = None
    ) -> tuple[Invoice, Usage]:
        extraction = await self.extract_document(text, invoice_key=invoice_key)
        return extraction.invoice, extraction.usage

    async def extract_document(
        self, text: str, *, pages: int | None = None, invoice_key: str | None = None
    ) -> Extraction:
        """Extract one invoice. ``invoice_key`` travels as ``X-Invoice-Key`` (for tracing
        and per-invoice request counting), percent-encoded because headers are ASCII."""
        sent, truncation = apply_budget(text, max_chars=self.max_chars, max_pages=self.max_pages)
        headers = {INVOICE_KEY_HEADER: quote(invoice_key, safe="/")} if invoice_key else None
        attempts = [0]
        token = _ATTEMPTS.set(attempts)
        usage = Usage()
        turns: list[dict[str, str]] = [{"role": "user", "content": user_message(sent, len(sent))}]
        try:
            for round_ in range(self.repair_attempts + 1):
                content, call_usage = await self._complete(turns, headers)
                usage += call_usage
                try:
                    invoice, notes = parse_answer(content, strict=self.mode == "json_schema")
                    break
                except ExtractionError as exc:
                    if round_ == self.repair_attempts:
                        raise
                    log.info("repairing answer for %s: %s", invoice_key, exc)
                    turns += [
                        {"role": "assistant", "content": content},
                        {"role": "user", "content": repair_message(exc)},
                    ]
        except ExtractionError as exc:
            charge(exc, attempts[0], usage, self.price)
            raise
        finally:
            _ATTEMPTS.reset(token)
        return llm_extraction(
            invoice,
            extractor=self.name,
            model=self.model,
            usage=usage,
            price=self.price,
            price_currency=self.price_currency,
            attempts=attempts[0],
            repaired=len(turns) > 1,
            truncation=truncation,
            notes=notes,
        )

    def _system_prompt(self) -> str:
        return SYSTEM_PROMPT if self.mode == "json_schema" else schema_instructions()

    async def _complete(
        self, turns: list[dict[str, str]], headers: dict[str, str] | None
    ) -> tuple[str, Usage]:
        """One logical call (the SDK may retry it); steps down the format ladder."""
        client = self._client_for_running_loop()
        while True:
            mode = self.mode
            system = self._system_prompt()
            messages: list[Any] = [{"role": "system", "content": system}, *turns]
            extra: dict[str, Any] = {}
            if mode in _RESPONSE_FORMATS:
                extra["response_format"] = _RESPONSE_FORMATS[mode]
            if self._max_output_tokens:
                extra["max_tokens"] = self._max_output_tokens
            estimate = estimate_tokens(system, *(t["content"] for t in turns)) + (
                self._max_output_tokens or DEFAULT_OUTPUT_ESTIMATE
            )
            async with self.limiter.call(tokens=estimate) as permit:
                try:
                    async with asyncio.timeout(self._max_total_s):
                        completion = await client.chat.completions.create(
                            model=self.model,
                            messages=messages,
                            temperature=self._temperature,
                            extra_headers=headers,
                            **extra,
                        )
                except ResponseTooLarge as exc:
                    raise ExtractionError("response_too_big", str(exc), transient=False) from exc
                except TimeoutError as exc:
                    raise ExtractionError(
                        "timeout",
                        f"LLM call (retries included) exceeded {self._max_total_s} s",
                        transient=True,
                    ) from exc
                except openai.APIStatusError as exc:
                    if self._may_step_down and _unsupported_format(exc) and mode == self.mode:
                        following = _LADDER.index(mode) + 1
                        if following < len(_LADDER):
                            self.mode = _LADDER[following]
                            log.warning(
                                "%s rejected response_format %s (%s); using %s from now on",
                                self._base_url,
                                mode,
                                exc.message,
                                self.mode,
                            )
                            continue
                    raise _map_api_error(exc) from exc
                except openai.APIError as exc:
                    raise _map_api_error(exc) from exc
                usage = _reported_usage(completion)
                permit.record(usage.total_tokens)
            return self._content(completion), usage

    @staticmethod
    def _content(completion: Any) -> str:
        if not completion.choices:
            raise ExtractionError("invalid_json", "LLM answered without choices", transient=False)
        choice = completion.choices[0]
        if choice.message.refusal:
            raise ExtractionError(
                "refusal", f"model refused: {choice.message.refusal}", transient=False
            )
        if choice.finish_reason == "content_filter":
            raise ExtractionError(
                "refusal", "answer stopped by the content filter", transient=False
            )
        if choice.finish_reason == "length":
            raise ExtractionError(
                "invalid_json", "answer cut off at the token limit", transient=False
            )
        if not choice.message.content:
            raise ExtractionError(
                "invalid_json", "LLM answered with empty content", transient=False
            )
        return str(choice.message.content)

    async def aclose(self) -> None:
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> OpenAIExtractor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
