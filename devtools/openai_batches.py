"""The OpenAI Files and Batches APIs for the loopback server (`devtools.llm_server`).

* ``POST /v1/files`` (multipart: ``purpose``, ``file``) stores a file;
  ``GET /v1/files/{id}`` describes it and ``GET /v1/files/{id}/content`` returns it.
* ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``,
  ``metadata``) checks every JSONL line (``custom_id`` unique, ``method`` POST, ``url`` the
  endpoint, a ``body``) and the request limit, counts each line as a request of its
  ``custom_id`` in ``_stats`` ``by_key`` (and ``batch_lines``), and starts the batch
  ``in_progress``.
* ``GET /v1/batches/{id}``: once ``delay_s`` has passed since creation, the batch is
  answered, exactly once: each line gets the chat completion an online request with
  that body would get (same answers, usage and prompt cache), written to the output
  file as ``{"custom_id", "response": {"status_code": 200, "body": ...}}``; lines
  matching a ``fail`` needle (a substring of ``custom_id`` or the last user message) go
  to the error file as ``{"custom_id", "response": null, "error": {"code":
  "server_error", ...}}``. With ``expire`` on, the batch ends ``expired`` instead,
  every line in the error file with code ``batch_expired``.
* ``GET /v1/batches`` lists batches newest first (``limit``, ``after``: a cursor page
  with ``has_more``), as ``batches.list`` pages through them.

Control: ``POST /_control/batches`` ``{"delay_s": 0.5, "fail": ["needle"], "expire":
false, "max_requests": 50000, "stall_upload_s": 0, "stall_create_s": 0,
"slow_downloads": 0, "slow_download_s": 0, "create_failures": []}`` (partial update).
The stalls are for crash tests: ``stall_upload_s`` holds the answer to a file upload
after storing the file, ``stall_create_s`` the answer to ``POST /v1/batches`` after the
batch was accepted (and its lines counted), so a client can be killed in between; the
next control update or reset ends them. The next ``slow_downloads`` file downloads each
wait ``slow_download_s`` first (or until the next control update). Each of the next
creates takes the first of ``create_failures``, ``{"status": 502, "accepted": true}``:
it answers that status, after creating the batch when ``accepted``. ``_stats`` reports
``batches`` (created), ``batch_lines``, ``files`` (uploaded) and ``downloads``
(started).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from devtools.llm_server import LLMServer

ENDPOINT = "/v1/chat/completions"


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    lines: list[dict[str, Any]]
    started: float
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "in_progress"
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    finished_at: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def describe(self) -> dict[str, Any]:
        ended = {
            "completed_at": self.finished_at if self.status == "completed" else None,
            "expired_at": self.finished_at if self.status == "expired" else None,
        }
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.created_at,
            "expires_at": self.created_at + 86_400,
            **ended,
            "request_counts": {
                "total": len(self.lines),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


class BatchAPI:
    """Files and batches state of one loopback server; answers through the server."""

    def __init__(self, server: LLMServer) -> None:
        self.server = server
        self.reset()

    def reset(self) -> None:
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self.delay_s = 0.0
        self.fail: list[str] = []
        self.expire = False
        self.max_requests = 50_000
        self.lines_received = 0
        self.stall_upload_s = 0.0
        self.stall_create_s = 0.0
        # Set by the next control update or reset: stalled answers go out at once.
        if (stalled := getattr(self, "unstalled", None)) is not None:
            stalled.set()
        self.unstalled = asyncio.Event()
        self.slow_downloads = 0
        self.slow_download_s = 0.0
        self.create_failures: list[dict[str, Any]] = []
        self.uploads = 0
        self.downloads = 0

    def stats(self) -> dict[str, Any]:
        return {
            "batches": len(self.batches),
            "batch_lines": self.lines_received,
            "files": self.uploads,
            "downloads": self.downloads,
        }

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.create_file, methods=["POST"]),
            Route("/v1/files/{file_id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
            Route("/_control/batches", self.control, methods=["POST"]),
        ]

    def _new_file(self, filename: str, purpose: str, content: bytes) -> _File:
        stored = _File(f"file-{uuid.uuid4().hex}", filename, purpose, content)
        self.files[stored.id] = stored
        return stored

    # -- endpoints ---------------------------------------------------------------------

    async def create_file(self, request: Request) -> Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        parts = _multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in parts or "purpose" not in parts:
            return _bad("multipart fields 'file' and 'purpose' are required")
        filename, content = parts["file"]
        stored = self._new_file(filename or "upload", parts["purpose"][1].decode(), content)
        self.uploads += 1
        await stall(self.stall_upload_s, self.unstalled)  # stored: a client killed now sent a file
        return JSONResponse(stored.describe())

    async def get_file(self, request: Request) -> Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        stored = self.files.get(request.path_params["file_id"])
        return JSONResponse(stored.describe()) if stored else _not_found("file")

    async def file_content(self, request: Request) -> Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        stored = self.files.get(request.path_params["file_id"])
        if stored is None:
            return _not_found("file")
        self.downloads += 1
        if self.slow_downloads > 0:
            self.slow_downloads -= 1
            await stall(self.slow_download_s, self.unstalled)
        return Response(stored.content, media_type="application/octet-stream")

    async def create_batch(self, request: Request) -> Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        body = json.loads(await request.body() or b"{}")
        failure = self.create_failures.pop(0) if self.create_failures else None
        if failure is not None and not failure.get("accepted"):
            return _error(int(failure["status"]), "scripted create failure (nothing created)")
        stored = self.files.get(str(body.get("input_file_id")))
        if stored is None or stored.purpose != "batch":
            return _bad("input_file_id must name an uploaded file with purpose 'batch'")
        if body.get("endpoint") != ENDPOINT:
            return _bad(f"endpoint must be {ENDPOINT}")
        try:
            lines = _checked_lines(stored.content, self.max_requests)
        except ValueError as exc:
            return _bad(str(exc))
        batch = _Batch(
            f"batch_{uuid.uuid4().hex}",
            stored.id,
            str(body.get("completion_window", "24h")),
            body.get("metadata"),
            lines,
            time.monotonic(),
        )
        self.batches[batch.id] = batch
        for line in lines:  # the provider has the requests now: count them like online ones
            self.server.total += 1
            self.server.by_key[line["custom_id"]] += 1
        self.lines_received += len(lines)
        await stall(self.stall_create_s, self.unstalled)  # accepted: a client killed now is billed
        if failure is not None:  # accepted, but the answer says otherwise (a gateway 502)
            return _error(int(failure["status"]), "scripted create failure (batch created)")
        return JSONResponse(batch.describe())

    async def list_batches(self, request: Request) -> Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        newest_first = sorted(self.batches.values(), key=lambda b: b.started, reverse=True)
        after = request.query_params.get("after")
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query_params.get("limit", 20))
        page = newest_first[:limit]
        return JSONResponse(
            {
                "object": "list",
                "data": [b.describe() for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(newest_first) > limit,
            }
        )

    async def get_batch(self, request: Request) -> Response:
        if (denied := self.server._auth_error(request)) is not None:
            return denied
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _not_found("batch")
        async with batch.lock:  # concurrent polls must not answer a batch twice
            if batch.status == "in_progress" and time.monotonic() - batch.started >= self.delay_s:
                await self._finish(batch)
        return JSONResponse(batch.describe())

    async def control(self, request: Request) -> Response:
        update = json.loads(await request.body() or b"{}")
        self.delay_s = float(update.get("delay_s", self.delay_s))
        self.fail = list(update.get("fail", self.fail))
        self.expire = bool(update.get("expire", self.expire))
        self.max_requests = int(update.get("max_requests", self.max_requests))
        self.stall_upload_s = float(update.get("stall_upload_s", self.stall_upload_s))
        self.stall_create_s = float(update.get("stall_create_s", self.stall_create_s))
        self.slow_downloads = int(update.get("slow_downloads", self.slow_downloads))
        self.slow_download_s = float(update.get("slow_download_s", self.slow_download_s))
        self.create_failures = list(update.get("create_failures", self.create_failures))
        self.unstalled.set()
        self.unstalled = asyncio.Event()
        return JSONResponse(
            {
                "delay_s": self.delay_s,
                "fail": self.fail,
                "expire": self.expire,
                "max_requests": self.max_requests,
                "stall_upload_s": self.stall_upload_s,
                "stall_create_s": self.stall_create_s,
                "slow_downloads": self.slow_downloads,
                "slow_download_s": self.slow_download_s,
                "create_failures": self.create_failures,
            }
        )

    # -- answering -----------------------------------------------------------------------

    async def _finish(self, batch: _Batch) -> None:
        from devtools.llm_server import _last_user_message

        output, errors = [], []
        for line in batch.lines:
            custom_id, body = line["custom_id"], line["body"]
            user = _last_user_message(body)
            if self.expire:
                errors.append(_error_line(custom_id, "batch_expired", "the batch expired"))
            elif any(needle in custom_id or needle in user for needle in self.fail):
                errors.append(_error_line(custom_id, "server_error", "scripted line failure"))
            else:
                cached = self.server._cache_lookup(body.get("messages") or [], custom_id)
                completion = await self.server._completion(body, user, [], cached)
                response = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": completion}
                output.append({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                               "response": response, "error": None})  # fmt: skip
        batch.completed, batch.failed = len(output), len(errors)
        if output:
            batch.output_file_id = self._new_file("output.jsonl", "batch_output", _jsonl(output)).id
        if errors:
            batch.error_file_id = self._new_file("errors.jsonl", "batch_output", _jsonl(errors)).id
        batch.status = "expired" if self.expire else "completed"
        batch.finished_at = int(time.time())


async def stall(seconds: float, unstalled: asyncio.Event) -> None:
    """Hold an answer ``seconds``, or until the next control update (a test's cue)."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(unstalled.wait(), seconds)


def _checked_lines(content: bytes, max_requests: int) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        line = json.loads(raw)
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or custom_id in seen:
            raise ValueError(f"line {number}: custom_id missing or not unique")
        if line.get("method") != "POST" or line.get("url") != ENDPOINT:
            raise ValueError(f"line {number}: method must be POST and url {ENDPOINT}")
        if not isinstance(line.get("body"), dict):
            raise ValueError(f"line {number}: body must be an object")
        seen.add(custom_id)
        lines.append(line)
    if not lines or len(lines) > max_requests:
        raise ValueError(f"a batch holds 1 to {max_requests} requests, not {len(lines)}")
    return lines


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename, bytes)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():  # type: ignore[attr-defined]
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _bad(message: str) -> JSONResponse:
    return _error(400, message)


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": None, "code": None}
    return JSONResponse({"error": error}, status_code=status)


def _not_found(what: str) -> JSONResponse:
    error = {"message": f"No such {what}", "type": "invalid_request_error", "param": None,
             "code": None}  # fmt: skip
    return JSONResponse({"error": error}, status_code=404)
