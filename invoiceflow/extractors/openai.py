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

Imports nothing from Prefect.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import quote

import httpx
import httpx2
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.extractors.limits import Limiter, Unlimited
from invoiceflow.extractors.llm import (
    LLM_SCHEMA,
    SYSTEM_PROMPT,
    VISION_PROMPT,
    PageImage,
    StructuredOutput,
    TokenPrice,
    VisionMode,
    batch_answer_extraction,
    budgeted_input,
    converse,
    count_attempt,
    estimate_tokens,
    fit_text,
    parse_invoice_content,
    repair_message,
    schema_instructions,
    user_message,
)
from invoiceflow.schema import Invoice, Truncation, Usage

__all__ = [
    "SYSTEM_PROMPT",
    "OpenAIExtractor",
    "Usage",
    "fit_text",
    "parse_invoice_content",
    "user_message",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

INVOICE_KEY_HEADER = "X-Invoice-Key"
DEFAULT_MODEL = "gpt-4o-mini"
# Roughly 12k tokens: every real invoice we expect fits, a 300-page scan does not.
DEFAULT_MAX_CHARS = 48_000
# Completion budget assumed for rate limiting before the real usage is known.
DEFAULT_OUTPUT_ESTIMATE = 1_000
# An invoice answer is a few KB. Far more means a broken or hostile endpoint, whose
# answer the SDK would otherwise read whole into memory.
DEFAULT_MAX_RESPONSE_BYTES = 2 * 1024 * 1024
# Connections per HTTP pool; more connections are spread over several pools.
CONNECTIONS_PER_POOL = 32
# OpenAI refuses images over 20 MB each.
MAX_IMAGE_BYTES = 20 * 1024 * 1024

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
    count_attempt()


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
    details = getattr(reported, "prompt_tokens_details", None)
    # The SDK keeps unknown shapes as-is: a dict from a batch output line, or a model.
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if details is not None and not isinstance(details, dict):
        cached = getattr(details, "cached_tokens", None)
    try:
        return Usage(
            prompt_tokens=reported.prompt_tokens,
            completion_tokens=reported.completion_tokens,
            cached_tokens=cached or 0,
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


def _check_settings(*, api_key: str, max_chars: int, repair_attempts: int) -> None:
    if not api_key:
        # The SDK would fall back to OPENAI_API_KEY from the environment; a blank
        # secret in our configuration must not silently pick up another key.
        raise ValueError("api_key must be a non-empty string")
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    if repair_attempts < 0:
        raise ValueError("repair_attempts must be >= 0")


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
        vision: VisionMode = "auto",
        max_images: int = 8,
        max_image_pixels: int = 2_500_000,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        batch_max_requests: int = 50_000,
        batch_max_bytes: int = 200 * 1024 * 1024,
        batch_completion_window: str = "24h",
    ) -> None:
        _check_settings(api_key=api_key, max_chars=max_chars, repair_attempts=repair_attempts)
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
        self.vision: VisionMode = vision
        self.max_images = max_images
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        # Provider batches (`llm_mode="batch"`): split limits and completion window.
        self.batch_max_requests = batch_max_requests
        self.batch_max_bytes = batch_max_bytes
        self.batch_completion_window = batch_completion_window
        self._clients: list[AsyncOpenAI] = []
        self._next_client = 0
        self._client_loop: asyncio.AbstractEventLoop | None = None
        # Built now on a thread and adopted by the first loop that calls: the first TLS
        # context of a process takes ~0.15 s (a lazy import), which the run's first
        # call would otherwise spend on the flow's loop.
        self._prebuilt: concurrent.futures.Future[list[AsyncOpenAI]] | None = _on_a_thread(
            self._new_pools
        )

    def __repr__(self) -> str:
        # Never the key.
        return f"OpenAIExtractor(base_url={self._base_url!r}, model={self.model!r})"

    def _new_client(self, max_connections: int, tls: ssl.SSLContext) -> AsyncOpenAI:
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        return AsyncOpenAI(
            base_url=self._base_url,
            api_key=self._api_key,
            timeout=self._timeout_s,
            max_retries=self._max_retries,
            default_headers=self._extra_headers or None,
            # The SDK converts httpx.Limits for its own HTTP stack.
            http_client=openai.DefaultAsyncHttpx2Client(
                verify=tls,
                limits=limits,
                event_hooks={
                    "request": [_count_request],
                    "response": [_reset_headers_to_retry_after, self._bound_body],
                },
            ),
        )

    def _new_pools(self) -> list[AsyncOpenAI]:
        # The connection pool scans all its connections on every request and every
        # response close (httpcore's _assign_requests_to_connections), so one pool of
        # 256 made each call cost O(256) on the event loop. Pools of at most
        # CONNECTIONS_PER_POOL, taken in turn, keep that scan short.
        pools = -(-self._max_connections // CONNECTIONS_PER_POOL)
        size = -(-self._max_connections // pools)
        # One TLS context for all (what each client would build alone: ~20 ms of CPU).
        tls = httpx2.create_ssl_context()
        return [self._new_client(size, tls) for _ in range(pools)]

    def batch_client(self) -> AsyncOpenAI:
        """A client for the Files and Batches APIs: same endpoint, key and retries, but
        without the per-answer byte bound (batch output files are large by design)."""
        return AsyncOpenAI(
            base_url=self._base_url,
            api_key=self._api_key,
            timeout=max(self._timeout_s, 300.0),
            max_retries=self._max_retries,
            default_headers=self._extra_headers or None,
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
        # deep inside the HTTP stack. A new loop therefore gets new clients; the old
        # ones cannot be closed from here and are left to the garbage collector.
        loop = asyncio.get_running_loop()
        if not self._clients or self._client_loop is not loop:
            prebuilt, self._prebuilt = self._prebuilt, None
            self._clients = prebuilt.result() if prebuilt is not None else self._new_pools()
            self._client_loop = loop
        self._next_client = (self._next_client + 1) % len(self._clients)
        return self._clients[self._next_client]

    async def extract(self, text: str) -> Invoice:
        return (await self.extract_document(text)).invoice

    async def extract_with_usage(
        self, text: str, *, invoice_key: str | None = None
    ) -> tuple[Invoice, Usage]:
        extraction = await self.extract_document(text, invoice_key=invoice_key)
        return extraction.invoice, extraction.usage

    async def extract_document(
        self,
        text: str,
        *,
        pages: int | None = None,
        invoice_key: str | None = None,
        images: Sequence[bytes] = (),
    ) -> Extraction:
        """Extract one invoice. ``invoice_key`` travels as ``X-Invoice-Key`` (for tracing
        and per-invoice request counting), percent-encoded because headers are ASCII.
        ``images`` (PNG pages) go as ``image_url`` data-URL parts of the user turn."""
        sent, truncation, pictures, notes = budgeted_input(
            self, text, images, max_image_bytes=self.max_image_bytes
        )
        headers = {INVOICE_KEY_HEADER: quote(invoice_key, safe="/")} if invoice_key else None
        chat = _OpenAIChat(self, user_message(sent, len(sent)), pictures, headers)
        return await converse(
            self, chat, truncation=truncation, invoice_key=invoice_key, notes=notes
        )

    # -- provider batches (invoiceflow.batch, invoiceflow.extractors.openai_batch) ------

    def batch_body(
        self, text: str, *, images: Sequence[bytes] = ()
    ) -> tuple[dict[str, Any], Truncation | None, list[str]]:
        """The chat-completions body of one invoice for a batch JSONL line, with what the
        budgets cut: the same messages, in the same order, as an online call."""
        sent, truncation, pictures, notes = budgeted_input(
            self, text, images, max_image_bytes=self.max_image_bytes
        )
        chat = _OpenAIChat(self, user_message(sent, len(sent)), pictures, None)
        system = self._system_prompt() + (VISION_PROMPT if pictures else "")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, *chat.turns],
            "temperature": self._temperature,
        }
        if self.mode in _RESPONSE_FORMATS:
            body["response_format"] = _RESPONSE_FORMATS[self.mode]
        if self._max_output_tokens:
            body["max_tokens"] = self._max_output_tokens
        return body, truncation, notes

    def batch_extraction(
        self,
        response_body: Mapping[str, Any],
        *,
        truncation: Truncation | None = None,
        notes: Sequence[str] = (),
    ) -> Extraction:
        """The `Extraction` of one batch output line's chat completion, billed at the
        price table's batch prices. A batch has no repair turn, so an answer that fails
        validation raises a *transient* `ExtractionError`: an online retry (with its
        repair turn) may still succeed, within the run's attempt cap."""
        try:
            completion = ChatCompletion.model_validate(response_body)
        except ValueError as exc:
            raise ExtractionError(
                "invalid_json", f"batch line is not a chat completion: {exc}", transient=True
            ) from exc
        return batch_answer_extraction(
            self,
            lambda: self._content(completion),
            strict=self.mode == "json_schema",
            usage=_reported_usage(completion),
            truncation=truncation,
            notes=notes,
        )

    def _system_prompt(self) -> str:
        return SYSTEM_PROMPT if self.mode == "json_schema" else schema_instructions()

    async def _complete(
        self,
        turns: list[dict[str, Any]],
        headers: dict[str, str] | None,
        *,
        image_tokens: int = 0,
    ) -> tuple[str, Usage]:
        """One logical call (the SDK may retry it); steps down the format ladder.

        ``image_tokens`` (the turns carry page images) adds to the rate-budget estimate.
        """
        client = self._client_for_running_loop()
        while True:
            mode = self.mode
            system = self._system_prompt() + (VISION_PROMPT if image_tokens else "")
            estimate = (
                estimate_tokens(system, *(_turn_text(t) for t in turns))
                + image_tokens
                + (self._max_output_tokens or DEFAULT_OUTPUT_ESTIMATE)
            )
            messages: list[Any] = [{"role": "system", "content": system}, *turns]
            async with self.limiter.call(tokens=estimate) as permit:
                completion = await self._create(client, mode, messages, headers)
                if completion is None:
                    continue  # the server refused the format; ask again one step down
                usage = _reported_usage(completion)
                permit.record(usage.total_tokens)
            try:
                return self._content(completion), usage
            except ExtractionError as exc:
                exc.usage = usage  # answered and billed, but unusable
                raise

    async def _create(
        self,
        client: AsyncOpenAI,
        mode: str,
        messages: list[Any],
        headers: dict[str, str] | None,
    ) -> Any | None:
        """One chat completion in ``mode``, errors mapped to `ExtractionError`; None
        when the server rejected ``mode`` and the extractor stepped down from it."""
        extra: dict[str, Any] = {}
        if mode in _RESPONSE_FORMATS:
            extra["response_format"] = _RESPONSE_FORMATS[mode]
        if self._max_output_tokens:
            extra["max_tokens"] = self._max_output_tokens
        try:
            async with asyncio.timeout(self._max_total_s):
                return await client.chat.completions.create(
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
            if self._stepped_down(mode, exc):
                return None
            raise _map_api_error(exc) from exc
        except openai.APIError as exc:
            raise _map_api_error(exc) from exc

    def _stepped_down(self, mode: str, exc: openai.APIStatusError) -> bool:
        """Step down the format ladder if ``exc`` rejects ``mode`` (once per mode, even
        with many calls failing at once); whether the caller should ask again."""
        if not (self._may_step_down and _unsupported_format(exc)):
            return False
        if mode != self.mode:
            return True  # another call already stepped down from it
        following = _LADDER.index(mode) + 1
        if following >= len(_LADDER):
            return False
        self.mode = _LADDER[following]
        log.warning(
            "%s rejected response_format %s (%s); using %s from now on",
            self._base_url,
            mode,
            exc.message,
            self.mode,
        )
        return True

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
        clients, self._clients, self._client_loop = self._clients, [], None
        for client in clients:
            await client.close()

    async def __aenter__(self) -> OpenAIExtractor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _on_a_thread(build: Callable[[], T]) -> concurrent.futures.Future[T]:
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-clients")
    future = pool.submit(build)
    pool.shutdown(wait=False)  # its thread ends once `build` returns
    return future


def _turn_text(turn: Mapping[str, Any]) -> str:
    content = turn["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def _image_part(page: PageImage) -> dict[str, Any]:
    data = base64.b64encode(page.png).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


class _OpenAIChat:
    """One invoice's chat-completions turns: the repair turn quotes the last answer.

    Page images travel once, as ``image_url`` data-URL parts after the text of the
    first user turn (gpt-4o-mini, Ollama llama3.2-vision and vLLM Qwen2-VL read them).
    """

    def __init__(
        self,
        extractor: OpenAIExtractor,
        text: str,
        pictures: Sequence[PageImage],
        headers: dict[str, str] | None,
    ) -> None:
        self._extractor = extractor
        self._headers = headers
        content: str | list[dict[str, Any]] = text
        if pictures:
            content = [{"type": "text", "text": text}, *(_image_part(p) for p in pictures)]
        self.turns: list[dict[str, Any]] = [{"role": "user", "content": content}]
        self._image_tokens = sum(p.tokens for p in pictures)
        self._last = ""

    @property
    def strict(self) -> bool:
        # Read after the call: a step down the format ladder relaxes it.
        return self._extractor.mode == "json_schema"

    async def ask(self) -> tuple[str, Usage]:
        self._last, usage = await self._extractor._complete(
            self.turns, self._headers, image_tokens=self._image_tokens
        )
        return self._last, usage

    def add_repair(self, error: ExtractionError) -> None:
        self.turns += [
            {"role": "assistant", "content": self._last},
            {"role": "user", "content": repair_message(error)},
        ]
