"""The OpenAI Batch API: one JSONL file through the Files API, `batches.create`, poll,
then the output and error files.

Requests in a batch cost about half the online price and are answered within the
completion window (24 h). The lines are the same chat-completions bodies an online
call sends (`OpenAIExtractor.batch_body`), keyed by ``custom_id``; answers are read by
`OpenAIExtractor.batch_extraction`. What to batch and how the answers are recorded is
`invoiceflow.batch`'s business; this module only moves files and batch objects.

Imports nothing from Prefect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import openai
from openai import AsyncOpenAI

from invoiceflow.extractors import ExtractionError
from invoiceflow.extractors.openai import OpenAIExtractor, _map_api_error

log = logging.getLogger(__name__)

ENDPOINT: Final = "/v1/chat/completions"
# The batch metadata key carrying invoiceflow's submission id (`invoiceflow.batch`).
SUBMISSION_KEY: Final = "invoiceflow_submission"
# Batch objects in these states will not change any more.
FINISHED: Final = frozenset({"completed", "failed", "expired", "cancelled"})
# OpenAI's documented limits per batch (requests) and per input file (bytes).
MAX_REQUESTS: Final = 50_000
MAX_FILE_BYTES: Final = 200 * 1024 * 1024


@dataclass(frozen=True)
class BatchLimits:
    """How a provider batch is split: requests per batch, bytes per input file, and the
    fewest requests the provider takes in one batch (Bedrock: a per-model quota)."""

    max_requests: int = MAX_REQUESTS
    max_bytes: int = MAX_FILE_BYTES
    completion_window: str = "24h"
    min_requests: int = 1


@dataclass(frozen=True)
class BatchState:
    batch_id: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    # Why a batch failed as a whole (validation errors), for the invoices' messages.
    errors: str = ""

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


# One line's answer: the chat-completion body, or why there is none.
LineResult = Mapping[str, Any] | ExtractionError


def jsonl_line(custom_id: str, body: Mapping[str, Any]) -> bytes:
    request = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def split(lines: Iterable[tuple[str, bytes]], limits: BatchLimits) -> list[list[tuple[str, bytes]]]:
    """Lines in file order, cut into batches within both limits. A line alone over the
    byte limit is a batch of its own (the provider refuses it; its invoice fails)."""
    batches: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for custom_id, line in lines:
        if current and (len(current) >= limits.max_requests or size + len(line) > limits.max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append((custom_id, line))
        size += len(line)
    if current:
        batches.append(current)
    return _even_out(batches, limits)


def _even_out(
    batches: list[list[tuple[str, bytes]]], limits: BatchLimits
) -> list[list[tuple[str, bytes]]]:
    """Give a last batch below the minimum lines from the one before, when both then
    meet it and the byte limit: 50,001 records are 49,900 + 101, not 50,000 + 1. A batch
    still below the minimum is the caller's to send otherwise."""
    if len(batches) < 2 or len(batches[-1]) >= limits.min_requests:
        return batches
    before, last = batches[-2], batches[-1]
    need = limits.min_requests - len(last)
    moved = before[-need:]
    if len(before) - need < limits.min_requests or (
        sum(len(line) for _, line in moved + last) > limits.max_bytes
    ):
        return batches
    return [*batches[:-2], before[:-need], moved + last]


class OpenAIBatches:
    """The Batch API of the extractor's endpoint, with the extractor's key and model."""

    provider = "openai"

    def __init__(self, extractor: OpenAIExtractor, limits: BatchLimits | None = None) -> None:
        self.extractor = extractor
        self.limits = limits or BatchLimits(
            extractor.batch_max_requests,
            extractor.batch_max_bytes,
            extractor.batch_completion_window,
        )
        self._client: AsyncOpenAI | None = None

    @staticmethod
    def record_id(key: str) -> str:
        """A line's ``custom_id``: the invoice key itself (unique within a run)."""
        return key

    @staticmethod
    def line(custom_id: str, body: Mapping[str, Any]) -> bytes:
        return jsonl_line(custom_id, body)

    def _api(self) -> AsyncOpenAI:
        # Its own client: batch files are far over the extractor's per-answer byte bound.
        if self._client is None:
            self._client = self.extractor.batch_client()
        return self._client

    async def submit(self, jsonl: bytes, submission_id: str, metadata: Mapping[str, str]) -> str:
        """Upload ``jsonl`` and start a batch over it that carries ``submission_id`` in
        its metadata; the batch id. The create is never retried blindly: a retry after a
        lost answer would start a second, billed batch (`find` tells instead)."""
        try:
            uploaded = await self._api().files.create(
                file=("invoiceflow-batch.jsonl", jsonl, "application/jsonl"), purpose="batch"
            )
            batch = (
                await self._api()
                .with_options(max_retries=0)
                .batches.create(
                    input_file_id=uploaded.id,
                    endpoint=ENDPOINT,
                    completion_window=self.limits.completion_window,  # type: ignore[arg-type]
                    metadata={**metadata, SUBMISSION_KEY: submission_id},
                )
            )
        except openai.APIError as exc:
            raise _map_api_error(exc) from exc
        log.info("submitted batch %s (%d bytes)", batch.id, len(jsonl))
        return batch.id

    async def find(self, submission_id: str) -> str | None:
        """The batch whose metadata carries ``submission_id``. The API filters by neither
        metadata nor date and does not document its order, so every page is read: this
        is for the rare submission no run recorded a batch id for."""
        try:
            async for batch in self._api().batches.list(limit=100):
                if (batch.metadata or {}).get(SUBMISSION_KEY) == submission_id:
                    return batch.id
        except openai.APIError as exc:
            raise _map_api_error(exc) from exc
        return None

    async def state(self, batch_id: str) -> BatchState:
        try:
            batch = await self._api().batches.retrieve(batch_id)
        except openai.APIError as exc:
            raise _map_api_error(exc) from exc
        errors = "; ".join(
            f"{e.code}: {e.message}" for e in (batch.errors.data or [] if batch.errors else [])
        )
        return BatchState(batch.id, batch.status, batch.output_file_id, batch.error_file_id, errors)

    async def results(self, state: BatchState) -> dict[str, LineResult]:
        """Every answered line by ``custom_id``: a 200 line's chat-completion body, or a
        transient `ExtractionError` for a failed one (the issue's rule: a later run may
        get an answer). Lines in neither file are left out."""
        found: dict[str, LineResult] = {}
        for file_id in (state.error_file_id, state.output_file_id):  # output wins
            if file_id:
                for line in (await self._content(file_id)).splitlines():
                    if line.strip():
                        custom_id, result = _line_result(json.loads(line))
                        found[custom_id] = result
        return found

    async def _content(self, file_id: str) -> bytes:
        try:
            response = await self._api().files.content(file_id)
        except openai.APIError as exc:
            raise _map_api_error(exc) from exc
        return response.content

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _line_result(line: Mapping[str, Any]) -> tuple[str, LineResult]:
    custom_id = str(line.get("custom_id"))
    response = line.get("response") or {}
    status = response.get("status_code")
    if status == 200 and isinstance(response.get("body"), Mapping):
        return custom_id, response["body"]
    error = line.get("error") or (response.get("body") or {}).get("error") or {}
    code = error.get("code") or (f"http_{status}" if status else "unknown")
    kind = "batch_expired" if code == "batch_expired" else "batch_line_failed"
    message = f"batch line failed ({code}): {error.get('message') or 'no message'}"
    return custom_id, ExtractionError(kind, message, transient=True)
