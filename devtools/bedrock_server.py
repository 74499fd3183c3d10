"""A loopback server answering AWS Bedrock's Converse API, for tests and benchmarks.

boto3 talks to it through ``endpoint_url``; nothing is mocked on the client side. It
reuses the OpenAI loopback server's machinery (fault plans, scripted answers,
latency, counting, control endpoints; see `devtools.llm_server`) and
speaks Bedrock instead:

* ``POST /model/{modelId}/converse`` answers with a ``toolUse`` block calling the
  requested tool (``toolConfig.toolChoice.tool.name``) whose ``input`` is the answer,
  ``stopReason: tool_use``, and ``usage`` (inputTokens = ceil(chars of system and
  messages / 4), outputTokens = ceil(chars of the answer / 4)). A scripted *string*
  answer comes back as a text block instead (a model ignoring the tool), a refusal as
  ``stopReason: guardrail_intervened``.
* Errors carry ``x-amzn-ErrorType`` (ThrottlingException for 429,
  InternalServerException for 500, ServiceUnavailableException for 503,
  ValidationException for 400, ...), which is how botocore names the exception.
* Requests must be SigV4-signed (``Authorization: AWS4-HMAC-SHA256 Credential=AKID/...``);
  with ``api_key`` set, the access key id must equal it. The signature itself is not
  verified.
* ``image`` content blocks are checked like Converse does (PNG/JPEG/GIF/WebP, at most
  20 a request, 3.75 MB and 8,000 px a side each; `devtools.images`), a breach
  answered 400 ValidationException; accepted ones are recorded in ``_stats``
  ``images`` and billed as input tokens.
* Prompt caching as Converse does it: the system text before a ``cachePoint`` block,
  once it is 1,024 tokens or more, is written to the cache by the first request
  (``cacheWriteInputTokens``) and read by every later one (``cacheReadInputTokens``);
  ``inputTokens`` then leaves those tokens out. ``_stats`` ``cached_tokens`` /
  ``cached_by_key`` count the reads.
* ``by_key`` counts ``requestMetadata.invoice_key`` (decoded from the extractor's
  ``=XX`` escaping), so retries of one invoice are countable.

The invoice text is taken from the last user turn holding the ``<invoice>`` envelope;
needles of faults and scripted answers match the last user turn's text (including
``toolResult`` text, i.e. a repair request).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from devtools.bedrock_batches import BedrockJobs
from devtools.images import BEDROCK_RULES, ImageRejected, decode_bedrock_image
from devtools.llm_server import (
    INVOICE_OPEN,
    AnswerValue,
    LLMServer,
    LLMServerConfig,
    LLMServerHandle,
    _KeepRawSend,
    _ResetConnection,
    invoice_text_of,
    serving_in_thread,
)

_ERROR_CODES: dict[int, str] = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
_ESCAPED = re.compile(rb"=([0-9A-F]{2})")


def _error(status: int, message: str, *, retry_after: str | None = None) -> JSONResponse:
    code = _ERROR_CODES.get(status, "InternalServerException" if status >= 500 else "BadRequest")
    headers = {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    return JSONResponse({"message": message}, status_code=status, headers=headers)


def _block_text(block: Any) -> str:
    if not isinstance(block, dict):
        return ""
    if isinstance(block.get("text"), str):
        return block["text"]
    result = block.get("toolResult")
    if isinstance(result, dict):
        return "".join(_block_text(b) for b in result.get("content") or [])
    return ""


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    return "".join(_block_text(b) for b in message.get("content") or [])


def _image_blocks(messages: list[Any]) -> list[tuple[str, bytes]]:
    """(declared media type, bytes) of every ``image`` block, in order."""
    return [
        decode_bedrock_image(block["image"])
        for message in messages
        if isinstance(message, dict)
        for block in message.get("content") or []
        if isinstance(block, dict) and "image" in block
    ]


def decode_metadata(value: str) -> str:
    """Undo `invoiceflow.extractors.bedrock.metadata_value`."""
    raw = _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), value.encode())
    return raw.decode("utf-8", errors="replace")


class BedrockServer(LLMServer):
    """Converse endpoint on top of `LLMServer`'s state, faults and control endpoints,
    plus batch inference jobs (`devtools.bedrock_batches`)."""

    def reset(self) -> None:
        super().reset()
        # Reset in place: the routes are bound to this object.
        if hasattr(self, "jobs"):
            self.jobs.reset()
        else:
            self.jobs = BedrockJobs(self, self.config.s3_endpoint)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), **self.jobs.stats()}

    def _sigv4_error(self, request: Request) -> JSONResponse | None:
        match = _CREDENTIAL.search(request.headers.get("authorization", ""))
        if match is None:
            return _error(403, "Missing Authentication Token")
        expected = self.config.api_key
        if expected is not None and match.group(1) != expected:
            return _error(403, "The security token included in the request is invalid.")
        return None

    async def converse(self, request: Request) -> Response:
        try:
            body: Any = json.loads(await request.body())
        except ValueError:
            body = None
        messages = body.get("messages") if isinstance(body, dict) else None
        messages = messages if isinstance(messages, list) else []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        last_user = _message_text(users[-1]) if users else ""
        metadata = body.get("requestMetadata") if isinstance(body, dict) else None
        raw_key = metadata.get("invoice_key") if isinstance(metadata, dict) else None
        key = decode_metadata(raw_key) if isinstance(raw_key, str) else None

        self.total += 1
        if key is not None:
            self.by_key[key] += 1
        started = self._enter()
        try:
            outcome, response = await self._converse(request, body, messages, users, last_user, key)
        except Exception:
            outcome, response = "500", _error(500, "answer function failed")
        finally:
            self._leave(started)
        self.by_status[outcome] += 1
        return response

    async def _converse(
        self,
        request: Request,
        body: Any,
        messages: list[Any],
        users: list[Any],
        last_user: str,
        key: str | None,
    ) -> tuple[str, Response]:
        if (denied := self._sigv4_error(request)) is not None:
            return "403", denied
        if not users:
            return "400", _error(400, "messages must contain a user turn")
        try:
            images = self._receive_images(_image_blocks(messages), BEDROCK_RULES, key)
        except ImageRejected as exc:
            return "400", _error(400, str(exc))
        fault = self._pick_fault(last_user, key)
        if fault is not None:
            status, retry_after, _ = fault
            if status == "timeout":
                await self._hang(request)
                return "timeout", Response(status_code=504)
            if status == "reset":
                return "reset", _ResetConnection()
            assert isinstance(status, int)
            if status >= 500:
                await self._sleep_latency()
            return str(status), _error(status, f"Injected fault {status}.", retry_after=retry_after)

        await self._sleep_latency()
        invoice_text = next(
            (
                invoice_text_of(_message_text(m))
                for m in reversed(users)
                if INVOICE_OPEN in _message_text(m)
            ),
            last_user,
        )
        answer, refusal = await self._scripted(last_user, invoice_text)
        tool = (((body.get("toolConfig") or {}).get("toolChoice") or {}).get("tool") or {}).get(
            "name", "record_invoice"
        )
        if refusal is not None:
            content: list[dict[str, Any]] = [{"text": refusal}]
            stop, answer_chars = "guardrail_intervened", len(refusal)
        elif isinstance(answer, str):
            content, stop, answer_chars = [{"text": answer}], "end_turn", len(answer)
        else:
            tool_use = {"toolUseId": f"tooluse_{uuid.uuid4().hex[:20]}", "name": tool}
            content = [{"toolUse": {**tool_use, "input": answer}}]
            stop, answer_chars = "tool_use", len(json.dumps(answer))
        system = body.get("system") or []
        prompt_chars = sum(len(_block_text(b)) for b in system) + sum(
            len(_message_text(m)) for m in messages
        )
        prompt_tokens = math.ceil(prompt_chars / 4) + sum(image.tokens for image in images)
        read, written = self._cache_point(system, key)
        # Like Converse: inputTokens leaves out what was read from or written to the cache.
        usage = {
            "inputTokens": prompt_tokens - read - written,
            "outputTokens": math.ceil(answer_chars / 4),
        }
        usage["totalTokens"] = prompt_tokens + usage["outputTokens"]
        if read or written:
            usage |= {"cacheReadInputTokens": read, "cacheWriteInputTokens": written}
        return "200", JSONResponse(
            {
                "output": {"message": {"role": "assistant", "content": content}},
                "stopReason": stop,
                "usage": usage,
                "metrics": {"latencyMs": int(self.latency_s * 1000)},
            },
            headers={"x-amzn-RequestId": str(uuid.uuid4())},
        )

    def _cache_point(self, system: list[Any], key: str | None) -> tuple[int, int]:
        """(read, written) cache tokens: the system text before a ``cachePoint`` block is
        cached once it reaches the minimum; without a cache point nothing is."""
        marks = [
            i for i, block in enumerate(system) if isinstance(block, dict) and "cachePoint" in block
        ]
        if not marks:
            return 0, 0
        static = "".join(_block_text(b) for b in system[: marks[0]])
        read, written = self.prompt_cache.static_hit(static)
        self.cached_tokens += read
        if read and key is not None:
            self.cached_by_key[key] += read
        return read, written

    async def _scripted(
        self, last_user: str, invoice_text: str
    ) -> tuple[AnswerValue | None, str | None]:
        for needle, refusal in self.refusals.items():
            if needle == "*" or needle in last_user:
                return None, refusal
        for needle, scripted in self.answers.items():
            if needle == "*" or needle in last_user:
                return scripted, None
        result = self.answer_fn(invoice_text)
        return (await result if hasattr(result, "__await__") else result), None

    def asgi_app(self) -> ASGIApp:
        routes = [
            Route("/model/{model_id:path}/converse", self.converse, methods=["POST"]),
            *self.jobs.routes(),
            *self.control_routes(),
        ]
        return _KeepRawSend(Starlette(routes=routes))


@dataclass(frozen=True)
class BedrockServerHandle(LLMServerHandle):
    """`LLMServerHandle` (stats, faults, answers, latency) plus ``endpoint_url``."""

    @property
    def endpoint_url(self) -> str:
        """What to give boto3 as ``endpoint_url``."""
        return self.root_url


@contextlib.contextmanager
def running_bedrock_server(
    port: int = 0, *, host: str = "127.0.0.1", **config: Any
) -> Iterator[BedrockServerHandle]:
    """Run the server on its own event loop in a daemon thread for the ``with`` block.

    ``config`` takes `LLMServerConfig` fields; ``api_key`` is the access key id that
    requests must be signed with.
    """
    app = BedrockServer(LLMServerConfig(**config)).asgi_app()
    with serving_in_thread(app, host, port, name="Bedrock") as bound_port:
        yield BedrockServerHandle(host, bound_port)
