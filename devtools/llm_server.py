"""A loopback OpenAI-compatible chat-completions server for tests and benchmarks.

It speaks just enough of the OpenAI HTTP API for the official SDK:

* ``POST /v1/chat/completions`` returns a ``chat.completion`` with ``usage``
  (``prompt_tokens`` = ceil(chars of all messages / 4), ``completion_tokens`` =
  ceil(chars of the answer / 4)) and the request's ``model`` echoed back.
* ``GET /v1/models`` lists the single pseudo model.
* the Files and Batches APIs (``/v1/files``, ``/v1/batches``): see
  `devtools.openai_batches`; batch lines are answered like online requests.

Prompt cache
    Like OpenAI: a prompt prefix (the text of the messages in order) of at least 1,024
    tokens seen before is served from the cache, in 128-token steps, and reported as
    ``usage.prompt_tokens_details.cached_tokens`` (`PromptCache`). ``_stats``
    ``cached_tokens`` / ``cached_by_key`` count what was served from it.

Both require ``Authorization: Bearer <token>``; a missing or empty token gets 401, and
if the server was given ``api_key`` the token must equal it. Tests use this to prove
the key really travels.

It runs on starlette + uvicorn (asyncio), so hundreds of concurrent slow requests cost
a coroutine each, not a thread each. Run it in-process with `running_llm_server`
(background thread, own event loop) or out of process with
``python -m devtools.llm_server --port 0 --latency 2 --jitter 0.2`` (prints
``invoiceflow-llm-server listening on http://HOST:PORT/v1`` once it accepts
connections) or `spawn_llm_server`, which wraps that command.

Answers
    The invoice text is the part of the last user message holding the envelope between
    the first ``<invoice>`` and the last ``</invoice>`` (what `OpenAIExtractor` sends;
    a later repair turn has no envelope), or the whole last user message if none has
    one. The answer is, first match wins:
    1. ``refusals``: needle -> refusal text (``message.refusal`` is set, content null);
    2. ``answers``: needle -> content, a str sent verbatim (so malformed JSON is
       possible) or a dict sent as JSON;
    3. ``answer_fn(invoice_text)``; the default `rules_answer` runs the offline
       ``RulesExtractor`` and falls back to an all-null invoice.
    A needle matches when it is ``"*"`` or a substring of the (last) user message.
    ``response_formats`` (config or ``POST /_control/config``) lists the
    ``response_format`` types the pretend model supports; any other gets a 400 naming
    ``response_format``, like servers without structured output.

Faults
    A fault plan is ``{"rules": [...], "rate": 0.0, "rate_statuses": [429, 500, 503],
    "rate_retry_after": null, "seed": 0}``. Each rule is ``{"match": "*", "status":
    429, "times": 1, "retry_after": "0.05"}``; ``match`` is ``"*"`` or a substring of
    the user message or of the ``X-Invoice-Key`` header; ``status`` is an HTTP error
    code (400-599), ``"timeout"`` (hold the request until the client hangs up, or
    ``hang_s``) or ``"reset"`` (abort the TCP connection without a response);
    ``times`` is how often the rule fires, -1 meaning forever; ``headers`` adds response
    headers (e.g. ``x-ratelimit-reset-requests``), ``code``/``message`` override the
    error body (e.g. ``context_length_exceeded``), ``body`` replaces the whole JSON body
    (status 200 is then allowed: a malformed answer). The first live matching
    rule fires; if none does, a random fault from ``rate_statuses`` fires with
    probability ``rate`` (``random.Random(seed)``, so a sequential run is reproducible;
    concurrent runs are only as reproducible as their arrival order).
    4xx answers come back at once, like a gateway rejecting before the model runs;
    200 and 5xx answers wait ``latency_s`` +- uniform ``jitter_s``.

Counting (``GET /_stats``)
    Every chat-completions request is counted on arrival, before auth and faults, so
    each SDK retry is one more count. ``by_key`` counts the ``X-Invoice-Key`` header
    (percent-decoded): the client states which invoice an attempt belongs to, which
    survives prompt rewording and truncation. ``by_sha1`` counts the sha1 hex of the
    last user message, which needs no client cooperation but breaks when the prompt
    text changes. ``by_status`` counts outcomes ("200", "429", "timeout", "reset", ...);
    ``in_flight`` / ``max_in_flight`` show real server-side concurrency; ``by_format``
    counts the requested ``response_format`` types ("json_schema", "none", ...);
    ``busy_s`` / ``first_start`` / ``last_end`` feed `utilisation` (slot busy share).

Images
    ``image_url`` parts must be base64 ``data:`` URLs of PNG, JPEG, GIF or WebP within
    OpenAI's limits (`devtools.images`; ``max_images`` lowers the count); a request
    breaking one gets a 400 ``invalid_image`` naming it. Accepted images are recorded
    in ``GET /_stats`` ``images`` (invoice key, media type, bytes, size, sha1) and
    billed as prompt tokens (OpenAI's high-detail tiling).

Control
    ``POST /_control/faults`` (a fault plan; replaces the current one),
    ``POST /_control/answers`` (``{"answers": {...}, "refusals": {...}}``; replaces),
    ``POST /_control/config`` (``{"latency_s": 0.5, "jitter_s": 0.1, "max_images": 2,
    "response_headers": {...}}``; partial update),
    ``POST /_control/reset`` (back to the constructor's configuration, stats zeroed),
    ``GET /_health``. Control endpoints need no API key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import math
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import httpx
import uvicorn
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from devtools.images import (
    OPENAI_RULES,
    ImageRejected,
    ImageRules,
    ReceivedImage,
    check_images,
    decode_data_url,
)
from devtools.openai_batches import BatchAPI
from invoiceflow.schema import Invoice

log = logging.getLogger(__name__)

# Same envelope as OpenAIExtractor; duplicated so the benchmark server process does not
# have to import the OpenAI SDK.
INVOICE_OPEN = "<invoice>"
INVOICE_CLOSE = "</invoice>"
INVOICE_KEY_HEADER = "x-invoice-key"
PSEUDO_MODEL = "invoiceflow-loopback"
READY_PREFIX = "invoiceflow-llm-server listening on "

AnswerValue = str | dict[str, Any]
AnswerFn = Callable[[str], Awaitable[AnswerValue]]

# Every schema key present and null: valid for `Invoice.llm_json_schema()` and for
# `Invoice`, and obviously not a real extraction.
FALLBACK_ANSWER: dict[str, Any] = Invoice().model_dump(mode="json")


def _check_status(value: int | str) -> int | str:
    if isinstance(value, int) and value != 200 and not 400 <= value <= 599:
        raise ValueError(f"fault status must be 200 or an HTTP error code 400-599, got {value}")
    return value


FaultStatus = Annotated[int | Literal["timeout", "reset"], AfterValidator(_check_status)]


class FaultRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: str = "*"
    status: FaultStatus
    times: int = Field(default=1, ge=-1)
    retry_after: str | None = None
    # Extra response headers, e.g. {"x-ratelimit-reset-requests": "0.2s"}.
    headers: dict[str, str] = Field(default_factory=dict)
    # Error body overrides, e.g. code "context_length_exceeded".
    code: str | None = None
    message: str | None = None
    # The whole JSON body to send instead (status may then be 200: a malformed answer).
    body: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _status_200_needs_body(self) -> FaultRule:
        if self.status == 200 and self.body is None:
            raise ValueError("a fault with status 200 must give the body to send")
        return self


class FaultPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[FaultRule] = Field(default_factory=list)
    rate: float = Field(default=0.0, ge=0.0, le=1.0)
    rate_statuses: list[FaultStatus] = Field(default_factory=lambda: [429, 500, 503], min_length=1)
    rate_retry_after: str | None = None
    seed: int = 0


class _AnswersUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answers: dict[str, str | dict[str, Any]] = Field(default_factory=dict)
    refusals: dict[str, str] = Field(default_factory=dict)


class _ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_s: float | None = Field(default=None, ge=0)
    jitter_s: float | None = Field(default=None, ge=0)
    # response_format types the "model" accepts ("json_schema", "json_object", "text");
    # an empty list restores the default of accepting every type.
    response_formats: list[str] | None = None
    # Headers added to every 200 answer (e.g. a gateway echoing a credential).
    response_headers: dict[str, str] | None = None
    # Images a request may carry; 0 restores the API's own limit.
    max_images: int | None = Field(default=None, ge=0)


async def rules_answer(invoice_text: str) -> dict[str, Any]:
    """Default answer: what the offline rules extractor makes of the text.

    Imported lazily because the rules extractor is developed separately and may not
    exist yet; any failure yields `FALLBACK_ANSWER`, since a real model also answers
    something schema-shaped for text it cannot read.
    """
    try:
        from invoiceflow.extractors.rules import RulesExtractor
    except ImportError:
        return dict(FALLBACK_ANSWER)
    try:
        invoice: Invoice = await RulesExtractor().extract(invoice_text)
    except Exception:
        log.warning("RulesExtractor failed; answering with the all-null invoice", exc_info=True)
        return dict(FALLBACK_ANSWER)
    # mode="json" renders Decimal as str and dates as ISO strings: the llm_json_schema shape.
    return invoice.model_dump(mode="json")


@dataclass
class LLMServerConfig:
    latency_s: float = 0.0
    jitter_s: float = 0.0
    api_key: str | None = None
    answers: Mapping[str, AnswerValue] = field(default_factory=dict)
    refusals: Mapping[str, str] = field(default_factory=dict)
    faults: Sequence[FaultRule | Mapping[str, Any]] = ()
    fault_rate: float = 0.0
    fault_statuses: Sequence[int | str] = (429, 500, 503)
    fault_retry_after: str | None = None
    seed: int = 0
    answer_fn: AnswerFn = rules_answer
    hang_s: float = 300.0
    # None accepts every response_format; otherwise others get a 400, like servers
    # without structured-output support.
    response_formats: Sequence[str] | None = None
    # Images a request may carry (None: the API's own limit, see devtools.images).
    max_images: int | None = None
    # S3 (e.g. moto) the Bedrock server's batch jobs read their input from and write to.
    s3_endpoint: str | None = None

    def fault_plan(self) -> FaultPlan:
        return FaultPlan.model_validate(
            {
                "rules": [
                    r.model_dump() if isinstance(r, FaultRule) else dict(r) for r in self.faults
                ],
                "rate": self.fault_rate,
                "rate_statuses": list(self.fault_statuses),
                "rate_retry_after": self.fault_retry_after,
                "seed": self.seed,
            }
        )


@dataclass
class _LiveRule:
    rule: FaultRule
    remaining: int


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _image_parts(messages: list[Any]) -> list[tuple[str, bytes]]:
    """(declared media type, bytes) of every ``image_url`` part, in order."""
    found = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else None
                found.append(decode_data_url(url))
    return found


def _messages(body: Any) -> list[Any]:
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        return body["messages"]
    return []


def _last_user_message(body: Any) -> str:
    for message in reversed(_messages(body)):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message)
    return ""


def _invoice_text(body: Any, last_user_message: str) -> str:
    """The invoice of a conversation: from the last user turn holding the envelope, so a
    repair turn ("your previous answer was rejected...") is still about that invoice."""
    for message in reversed(_messages(body)):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _message_text(message)
            if INVOICE_OPEN in text:
                return invoice_text_of(text)
    return invoice_text_of(last_user_message)


def invoice_text_of(user_message: str) -> str:
    """The invoice text inside the extractor's envelope (or the whole message)."""
    start = user_message.find(INVOICE_OPEN)
    end = user_message.rfind(INVOICE_CLOSE)
    if start == -1 or end < start:
        return user_message
    return user_message[start + len(INVOICE_OPEN) : end].strip("\n")


def _tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    retry_after: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = dict(extra_headers or {})
    if retry_after is not None:
        headers["retry-after"] = retry_after
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}

_RAW_SEND = "invoiceflow.raw_send"


class _KeepRawSend:
    """Puts the server's own ``send`` into the scope so a fault can reach the socket.

    Starlette wraps ``send`` on the way down; uvicorn's original is a bound method of
    its request cycle, whose ``transport`` is the only way to drop a connection
    before any response bytes exist.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RAW_SEND] = send
        await self.app(scope, receive, send)


class _ResetConnection(Response):
    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = getattr(scope.get(_RAW_SEND), "__self__", None)
        transport = getattr(cycle, "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()
            # abort() schedules connection_lost; yielding once lets uvicorn mark the
            # cycle disconnected, so it neither sends a 500 nor logs an unfinished reply.
            await asyncio.sleep(0)
            return
        # Not uvicorn's h11/httptools cycle: next best is a reply cut off mid-body.
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"id": "chatcmpl-', "more_body": True})


# OpenAI's prompt cache: prefixes of at least 1,024 tokens, matched in 128-token steps.
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128
CHARS_PER_TOKEN = 4


class PromptCache:
    """Prompt prefixes the server has seen, the way providers cache them.

    A prefix counts from ``CACHE_MIN_TOKENS`` on, in steps of ``CACHE_STEP_TOKENS``
    (OpenAI's documented granularity); tokens are the server's chars/4. A prompt is
    stored when it arrives, so the second request with the same static prefix is a
    hit even while the first is still being answered (real caches fill slightly later;
    tests need a deterministic rule). Never expires; `LLMServer.reset` empties it.
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def tokens_hit(self, text: str, *, store: bool = True) -> int:
        """Tokens of the longest stored prefix of ``text`` (0 below the minimum)."""
        step = CACHE_STEP_TOKENS * CHARS_PER_TOKEN
        digest = hashlib.sha1()
        hit, pos, new = 0, 0, []
        for end in range(CACHE_MIN_TOKENS * CHARS_PER_TOKEN, len(text) + 1, step):
            digest.update(text[pos:end].encode())
            pos = end
            prefix = digest.digest()  # hashlib's digest() leaves the state usable
            if prefix in self._seen:
                hit = end
            new.append(prefix)
        if store:
            self._seen.update(new)
        return hit // CHARS_PER_TOKEN

    def static_hit(self, static: str) -> tuple[int, int]:
        """(read, written) tokens for an explicitly marked static part (Bedrock's
        ``cachePoint``): read when seen before, written the first time, nothing when
        shorter than the minimum."""
        tokens = len(static) // CHARS_PER_TOKEN
        if tokens < CACHE_MIN_TOKENS:
            return 0, 0
        key = b"static:" + hashlib.sha1(static.encode()).digest()
        if key in self._seen:
            return tokens, 0
        self._seen.add(key)
        return 0, tokens


class LLMServer:
    """The application state and endpoints. All state lives on the server's event loop
    (control calls arrive over HTTP too), so no locking is needed."""

    def __init__(self, config: LLMServerConfig) -> None:
        self.config = config
        self.answer_fn = config.answer_fn
        self.reset()

    def reset(self) -> None:
        self.latency_s = self.config.latency_s
        self.jitter_s = self.config.jitter_s
        self.answers: dict[str, AnswerValue] = dict(self.config.answers)
        self.refusals: dict[str, str] = dict(self.config.refusals)
        self._set_plan(self.config.fault_plan())
        # Jitter has its own RNG so latency draws never shift which request a random
        # fault hits.
        self._jitter_rng = random.Random(self.config.seed + 1)
        self.total = 0
        self.models_requests = 0
        self.by_key: Counter[str] = Counter()
        self.by_sha1: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.by_format: Counter[str] = Counter()
        formats = self.config.response_formats
        self.response_formats: set[str] | None = set(formats) if formats is not None else None
        self.response_headers: dict[str, str] = {}
        self.max_images: int | None = self.config.max_images
        self.images: list[ReceivedImage] = []
        self.prompt_cache = PromptCache()
        # Reset in place: the routes are bound to this object.
        if hasattr(self, "batch_api"):
            self.batch_api.reset()
        else:
            self.batch_api = BatchAPI(self)
        # Prompt tokens served from the cache, by invoice key (None: no key header).
        self.cached_by_key: Counter[str] = Counter()
        self.cached_tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0
        # Request-seconds spent inside the server, and the window they fell in, so a
        # benchmark can tell how busy the provider's slots were (see `utilisation`).
        self.busy_s = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def _set_plan(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.rules = [_LiveRule(rule, rule.times) for rule in plan.rules]
        self._fault_rng = random.Random(plan.seed)

    def stats(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_key": dict(self.by_key),
            "by_sha1": dict(self.by_sha1),
            "by_status": dict(self.by_status),
            "by_format": dict(self.by_format),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "models_requests": self.models_requests,
            "busy_s": self.busy_s,
            "first_start": self.first_start,
            "last_end": self.last_end,
            "images": [image.as_dict() for image in self.images],
            "cached_tokens": self.cached_tokens,
            "cached_by_key": dict(self.cached_by_key),
            **self.batch_api.stats(),
        }

    def _enter(self) -> float:
        started = time.monotonic()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.first_start is None:
            self.first_start = started
        return started

    def _leave(self, started: float) -> None:
        self.in_flight -= 1
        ended = time.monotonic()
        self.busy_s += ended - started
        self.last_end = ended

    def fault_snapshot(self) -> dict[str, Any]:
        return {
            **self.plan.model_dump(exclude={"rules"}),
            "rules": [
                {**live.rule.model_dump(), "remaining": live.remaining} for live in self.rules
            ],
        }

    def _pick_fault(
        self, user_message: str, key: str | None
    ) -> tuple[int | str, str | None, FaultRule | None] | None:
        for live in self.rules:
            needle = live.rule.match
            if live.remaining == 0:
                continue
            if needle == "*" or needle in user_message or (key is not None and needle in key):
                if live.remaining > 0:
                    live.remaining -= 1
                return live.rule.status, live.rule.retry_after, live.rule
        # Only drawn when no rule fired, so scripted rules don't shift the random sequence.
        if self.plan.rate > 0 and self._fault_rng.random() < self.plan.rate:
            return self._fault_rng.choice(self.plan.rate_statuses), self.plan.rate_retry_after, None
        return None

    def _receive_images(
        self, found: list[tuple[str, bytes]], rules: ImageRules, key: str | None
    ) -> list[ReceivedImage]:
        """Check a request's images (`ImageRejected` if they break a rule); record them."""
        if self.max_images is not None:
            rules = replace(rules, max_images=self.max_images)
        received = check_images(found, rules, key)
        self.images += received
        return received

    def _auth_error(self, request: Request) -> JSONResponse | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _error(
                401,
                "Missing bearer API key.",
                type_="invalid_request_error",
                code="invalid_api_key",
            )
        expected = self.config.api_key
        if expected is not None and not secrets.compare_digest(token.encode(), expected.encode()):
            return _error(
                401,
                "Incorrect API key provided.",
                type_="invalid_request_error",
                code="invalid_api_key",
            )
        return None

    async def _sleep_latency(self) -> None:
        delay = self.latency_s
        if self.jitter_s > 0:
            delay += self._jitter_rng.uniform(-self.jitter_s, self.jitter_s)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _hang(self, request: Request) -> None:
        async def until_disconnect() -> None:
            # The body is already read, so the next ASGI message is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until_disconnect(), self.config.hang_s)

    async def _answer(self, user_message: str, invoice_text: str) -> tuple[str | None, str | None]:
        """(content, refusal) for one request."""
        for needle, refusal in self.refusals.items():
            if needle == "*" or needle in user_message:
                return None, refusal
        value: AnswerValue | None = None
        for needle, scripted in self.answers.items():
            if needle == "*" or needle in user_message:
                value = scripted
                break
        if value is None:
            result: Any = self.answer_fn(invoice_text)
            value = await result if inspect.isawaitable(result) else result
        return (value if isinstance(value, str) else json.dumps(value)), None

    # -- endpoints ---------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        user_message = _last_user_message(body)
        header_key = request.headers.get(INVOICE_KEY_HEADER)
        key = unquote(header_key) if header_key is not None else None

        self.total += 1
        if key is not None:
            self.by_key[key] += 1
        self.by_sha1[hashlib.sha1(user_message.encode()).hexdigest()] += 1
        started = self._enter()
        try:
            outcome, response = await self._chat(request, body, user_message, key)
        except Exception:
            log.exception("loopback LLM server failed to answer")
            outcome, response = "500", _error(500, "answer function failed", type_="server_error")
        finally:
            self._leave(started)
        self.by_status[outcome] += 1
        return response

    async def _chat(
        self, request: Request, body: Any, user_message: str, key: str | None
    ) -> tuple[str, Response]:
        if (denied := self._auth_error(request)) is not None:
            return "401", denied
        messages = _messages(body)
        if not messages or not isinstance(body.get("model"), str):
            return "400", _error(
                400, "'model' and 'messages' are required.", type_="invalid_request_error"
            )

        response_format = body.get("response_format")
        format_type = (
            str(response_format.get("type"))
            if isinstance(response_format, dict)
            else ("none" if response_format is None else "?")
        )
        self.by_format[format_type] += 1
        if (
            self.response_formats is not None
            and response_format is not None
            and format_type not in self.response_formats
        ):
            return "400", _error(
                400,
                f"response_format type '{format_type}' is not supported by this model.",
                type_="invalid_request_error",
                code="unsupported_response_format",
            )

        try:
            images = self._receive_images(_image_parts(messages), OPENAI_RULES, key)
        except ImageRejected as exc:
            return "400", _error(400, str(exc), type_="invalid_request_error", code="invalid_image")
        fault = self._pick_fault(user_message, key)
        if fault is not None:
            status, retry_after, rule = fault
            if status == "timeout":
                await self._hang(request)
                return "timeout", Response(status_code=504)
            if status == "reset":
                return "reset", _ResetConnection()
            assert isinstance(status, int)
            if rule is not None and rule.body is not None:
                return str(status), JSONResponse(rule.body, status, headers=rule.headers)
            if status >= 500:
                await self._sleep_latency()
                type_, code = "server_error", None
            else:
                type_, code = _ERROR_TYPES.get(status, ("invalid_request_error", None))
            return str(status), _error(
                status,
                (rule.message if rule and rule.message else None) or f"Injected fault {status}.",
                type_=type_,
                code=(rule.code if rule and rule.code else None) or code,
                retry_after=retry_after,
                extra_headers=rule.headers if rule else None,
            )

        cached = self._cache_lookup(messages, key)
        await self._sleep_latency()
        return "200", JSONResponse(
            await self._completion(body, user_message, images, cached),
            headers={"x-request-id": uuid.uuid4().hex, **self.response_headers},
        )

    def _cache_lookup(self, messages: list[Any], key: str | None) -> int:
        """Cached prompt tokens of a request, recorded per key (see `PromptCache`)."""
        cached = self.prompt_cache.tokens_hit("".join(_message_text(m) for m in messages))
        self.cached_tokens += cached
        if cached and key is not None:
            self.cached_by_key[key] += cached
        return cached

    async def _completion(
        self, body: Any, user_message: str, images: list[ReceivedImage], cached: int
    ) -> dict[str, Any]:
        """The chat.completion object answering ``body`` (online and batch lines)."""
        messages = _messages(body)
        content, refusal = await self._answer(user_message, _invoice_text(body, user_message))
        prompt_chars = sum(len(_message_text(m)) for m in messages)
        answer_chars = len(content if content is not None else refusal or "")
        prompt_tokens = _tokens(prompt_chars) + sum(image.tokens for image in images)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _tokens(answer_chars),
            "total_tokens": prompt_tokens + _tokens(answer_chars),
            "prompt_tokens_details": {"cached_tokens": min(cached, prompt_tokens)},
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": PSEUDO_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }

    async def models(self, request: Request) -> Response:
        self.models_requests += 1
        if (denied := self._auth_error(request)) is not None:
            return denied
        model = {"id": PSEUDO_MODEL, "object": "model", "created": 0, "owned_by": "invoiceflow"}
        return JSONResponse({"object": "list", "data": [model]})

    async def get_stats(self, request: Request) -> Response:
        return JSONResponse(self.stats())

    async def control_faults(self, request: Request) -> Response:
        try:
            plan = FaultPlan.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": json.loads(exc.json(include_url=False))}, 422)
        self._set_plan(plan)
        return JSONResponse(self.fault_snapshot())

    async def control_answers(self, request: Request) -> Response:
        try:
            update = _AnswersUpdate.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": json.loads(exc.json(include_url=False))}, 422)
        self.answers = dict(update.answers)
        self.refusals = dict(update.refusals)
        return JSONResponse({"answers": self.answers, "refusals": self.refusals})

    async def control_config(self, request: Request) -> Response:
        try:
            update = _ConfigUpdate.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            return JSONResponse({"error": json.loads(exc.json(include_url=False))}, 422)
        if update.latency_s is not None:
            self.latency_s = update.latency_s
        if update.jitter_s is not None:
            self.jitter_s = update.jitter_s
        if update.response_formats is not None:
            self.response_formats = set(update.response_formats) or None
        if update.response_headers is not None:
            self.response_headers = dict(update.response_headers)
        if update.max_images is not None:
            self.max_images = update.max_images or None
        formats = sorted(self.response_formats) if self.response_formats is not None else None
        return JSONResponse(
            {"latency_s": self.latency_s, "jitter_s": self.jitter_s, "response_formats": formats}
        )

    async def control_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"ok": True})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def asgi_app(self) -> ASGIApp:
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            *self.batch_api.routes(),
            *self.control_routes(),
        ]
        return _KeepRawSend(Starlette(routes=routes))

    def control_routes(self) -> list[Route]:
        """Stats, fault/answer/config control, reset and health: every loopback server's."""
        return [
            Route("/_stats", self.get_stats, methods=["GET"]),
            Route("/_control/faults", self.control_faults, methods=["POST"]),
            Route("/_control/answers", self.control_answers, methods=["POST"]),
            Route("/_control/config", self.control_config, methods=["POST"]),
            Route("/_control/reset", self.control_reset, methods=["POST"]),
            Route("/_health", self.health, methods=["GET"]),
        ]


def utilisation(stats: Mapping[str, Any], *, slots: int) -> float:
    """How busy ``slots`` provider slots were, measured at the provider: request-seconds
    served / (slots x seconds from the first request's arrival to the last answer).

    ``stats`` is `LLMServerHandle.stats()` (after a `reset` before the measured load).
    With the provider limit at ``slots``, 1.0 means no slot was ever idle.
    """
    first, last = stats.get("first_start"), stats.get("last_end")
    if first is None or last is None or last <= first or slots < 1:
        return 0.0
    return min(1.0, float(stats["busy_s"]) / (slots * (last - first)))


def build_app(config: LLMServerConfig | None = None, **kwargs: Any) -> ASGIApp:
    """The ASGI app, for embedding in another server; kwargs are `LLMServerConfig` fields."""
    return LLMServer(config or LLMServerConfig(**kwargs)).asgi_app()


# -- handles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMServerHandle:
    """Talks to a running server over HTTP, so it works the same in- or out-of-process.

    Methods are synchronous; from async tests they briefly block the test's loop, which
    is harmless because the server never runs on that loop.
    """

    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> LLMServerHandle:
        parsed = httpx.URL(url)
        if parsed.host is None or parsed.port is None:
            raise ValueError(f"need an URL with host and port, got {url!r}")
        return cls(parsed.host, parsed.port)

    @property
    def root_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to give an OpenAI client as ``base_url``."""
        return f"{self.root_url}/v1"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        # trust_env=False: a proxy from the environment must never sit between a test
        # and its loopback server.
        with httpx.Client(base_url=self.root_url, trust_env=False, timeout=10.0) as client:
            response = client.request(method, path, json=payload)
            response.raise_for_status()
            return response.json()

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_stats")

    def requests_for_key(self, key: str) -> int:
        return int(self.stats()["by_key"].get(key, 0))

    def set_faults(
        self,
        rules: Sequence[FaultRule | Mapping[str, Any]] = (),
        *,
        rate: float = 0.0,
        rate_statuses: Sequence[int | str] = (429, 500, 503),
        rate_retry_after: str | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Replace the fault plan; returns it with each rule's ``remaining`` count."""
        plan = FaultPlan.model_validate(
            {
                "rules": [r.model_dump() if isinstance(r, FaultRule) else dict(r) for r in rules],
                "rate": rate,
                "rate_statuses": list(rate_statuses),
                "rate_retry_after": rate_retry_after,
                "seed": seed,
            }
        )
        return self._call("POST", "/_control/faults", plan.model_dump())

    def set_answers(
        self,
        answers: Mapping[str, AnswerValue] | None = None,
        refusals: Mapping[str, str] | None = None,
    ) -> None:
        """Replace scripted answers and refusals (needle -> content / refusal text)."""
        payload = {"answers": dict(answers or {}), "refusals": dict(refusals or {})}
        self._call("POST", "/_control/answers", payload)

    def configure(
        self,
        *,
        latency_s: float | None = None,
        jitter_s: float | None = None,
        response_formats: Sequence[str] | None = None,
        response_headers: Mapping[str, str] | None = None,
        max_images: int | None = None,
    ) -> None:
        """Partial update; ``response_formats=[]`` accepts every format again,
        ``response_headers`` are added to every 200 answer (``{}`` removes them),
        ``max_images=0`` restores the API's own image count limit."""
        payload = {
            "max_images": max_images,
            "latency_s": latency_s,
            "jitter_s": jitter_s,
            "response_formats": list(response_formats) if response_formats is not None else None,
            "response_headers": dict(response_headers) if response_headers is not None else None,
        }
        self._call("POST", "/_control/config", payload)

    def configure_batches(
        self,
        *,
        delay_s: float | None = None,
        fail: Sequence[str] | None = None,
        expire: bool | None = None,
        max_requests: int | None = None,
        **more: float | int | None,
    ) -> dict[str, Any]:
        """Batch API behaviour (`devtools.openai_batches`, `devtools.bedrock_batches`):
        answer ``delay_s`` after creation, fail lines matching a ``fail`` needle,
        ``expire`` batches instead of answering them, refuse batches over
        ``max_requests``; ``more`` are the server's other controls (stalls, slow
        downloads, Bedrock's ``min_records``). Partial update."""
        update = {"delay_s": delay_s, "fail": list(fail) if fail is not None else None,
                  "expire": expire, "max_requests": max_requests, **more}  # fmt: skip
        return self._call(
            "POST", "/_control/batches", {k: v for k, v in update.items() if v is not None}
        )

    def images(self, key: str | None = None) -> list[dict[str, Any]]:
        """The images requests carried (of invoice ``key`` only, if given), in order."""
        images = self.stats()["images"]
        return [i for i in images if key is None or i["key"] == key]

    def reset(self) -> None:
        """Back to the server's start-up configuration, with all counters at zero."""
        self._call("POST", "/_control/reset")


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP (not 0) matters: asyncio only sets TCP_NODELAY on accepted sockets
    # whose proto says TCP, and without it every answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening before uvicorn starts means the port is usable the moment we report
        # it: early connections wait in the backlog instead of being refused.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _uvicorn_config(app: ASGIApp, **overrides: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="asyncio",
        http="h11",
        lifespan="off",
        access_log=False,
        backlog=2048,
        timeout_graceful_shutdown=2,
        **overrides,
    )


@contextlib.contextmanager
def running_llm_server(
    port: int = 0, *, host: str = "127.0.0.1", **config: Any
) -> Iterator[LLMServerHandle]:
    """Run the server on its own event loop in a daemon thread for the ``with`` block.

    ``config`` takes `LLMServerConfig` fields (latency_s, jitter_s, api_key, answers,
    refusals, faults, fault_rate, fault_statuses, fault_retry_after, seed, answer_fn,
    hang_s). Port 0 picks a free port; ``handle.port`` is the real one.
    """
    app = build_app(LLMServerConfig(**config))
    with serving_in_thread(app, host, port, name="LLM") as bound_port:
        yield LLMServerHandle(host, bound_port)


@contextlib.contextmanager
def serving_in_thread(app: ASGIApp, host: str, port: int, *, name: str) -> Iterator[int]:
    """Serve `app` with uvicorn on its own event loop in a daemon thread; yields the port."""
    sock = _listening_socket(host, port)
    # log_config=None: don't let uvicorn's dictConfig rewire the test process's logging.
    server = uvicorn.Server(_uvicorn_config(app, log_config=None))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"{name}-server", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"loopback {name} server thread died during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"loopback {name} server did not start within 15 s")
            time.sleep(0.005)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@contextlib.contextmanager
def spawn_llm_server(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    latency_s: float = 0.0,
    jitter_s: float = 0.0,
    api_key: str | None = None,
    fault_rate: float = 0.0,
    seed: int = 0,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 30.0,
) -> Iterator[LLMServerHandle]:
    """Run the server as a child process (its CPU then isn't the benchmark's)."""
    argv = [
        sys.executable, "-m", "devtools.llm_server",
        "--host", host, "--port", str(port),
        "--latency", str(latency_s), "--jitter", str(jitter_s),
        "--fault-rate", str(fault_rate), "--seed", str(seed),
        *(["--api-key", api_key] if api_key is not None else []),
        *extra_args,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        ready: list[str] = []

        def read_ready_line() -> None:
            if proc.stdout is not None:
                ready.append(proc.stdout.readline())

        # readline() has no timeout; a helper thread keeps a hung child from hanging us.
        reader = threading.Thread(target=read_ready_line, daemon=True)
        reader.start()
        reader.join(startup_timeout_s)
        line = ready[0].strip() if ready else ""
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"loopback LLM server did not start (exit code {proc.poll()})")
        yield LLMServerHandle.from_url(line.removeprefix(READY_PREFIX))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.llm_server",
        description="Loopback OpenAI-compatible chat-completions server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="+- uniform seconds")
    parser.add_argument("--api-key", default=None, help="require exactly this bearer token")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument(
        "--fault-statuses",
        default="429,500,503",
        help="comma-separated codes or timeout/reset for random faults",
    )
    parser.add_argument("--fault-retry-after", default=None)
    parser.add_argument("--faults", default="[]", help="JSON list of fault rules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang", type=float, default=300.0, help="max seconds of a timeout fault")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    statuses = [
        int(s) if s.strip().isdigit() else s.strip() for s in args.fault_statuses.split(",")
    ]
    config = LLMServerConfig(
        latency_s=args.latency,
        jitter_s=args.jitter,
        api_key=args.api_key,
        faults=json.loads(args.faults),
        fault_rate=args.fault_rate,
        fault_statuses=statuses,
        fault_retry_after=args.fault_retry_after,
        seed=args.seed,
        hang_s=args.hang,
    )
    app = build_app(config)  # validates the fault plan before we report readiness
    sock = _listening_socket(args.host, args.port)
    handle = LLMServerHandle(args.host, sock.getsockname()[1])
    print(f"{READY_PREFIX}{handle.base_url}", flush=True)
    uvicorn.Server(_uvicorn_config(app, log_level=args.log_level)).run(sockets=[sock])


if __name__ == "__main__":
    main()
