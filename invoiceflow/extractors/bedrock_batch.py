"""Bedrock batch inference: JSONL in S3, `create_model_invocation_job`, poll, read the
``.jsonl.out`` output in S3.

Each line is ``{"recordId", "modelInput"}``, where ``modelInput`` is what InvokeModel
would take. For Anthropic models on Bedrock that is the Messages API: the same static
system prompt as online, marked for the prompt cache with ``cache_control``, the same
forced tool call, and the document last. Bedrock bills it at about half the on-demand
price.

What to batch and how answers are recorded is `invoiceflow.batch`'s business. This
module moves the files and jobs, and it speaks the Anthropic Messages format.

Bedrock wants ``roleArn``: a role Bedrock assumes to read the input and write the
output. The files go to ``s3_uri`` (``s3://bucket/prefix/``).

Imports nothing from Prefect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.extractors.bedrock import (
    BEDROCK_SYSTEM_PROMPT,
    TOOL_NAME,
    BedrockExtractor,
    map_bedrock_error,
)
from invoiceflow.extractors.llm import (
    LLM_SCHEMA,
    apply_budget,
    batch_answer_extraction,
    user_message,
)
from invoiceflow.extractors.openai_batch import BatchLimits, BatchState, LineResult
from invoiceflow.schema import Truncation, Usage

log = logging.getLogger(__name__)

ANTHROPIC_VERSION: Final = "bedrock-2023-05-31"
# Bedrock's job states -> the batch states `invoiceflow.batch` knows.
_STATES: Final = {
    "Completed": "completed",
    "PartiallyCompleted": "completed",
    "Failed": "failed",
    "Stopped": "cancelled",
    "Expired": "expired",
}
# Bedrock's bounds per job. The minimum is the quota "Minimum number of records per
# batch inference job for <model>" (Amazon Bedrock endpoints and quotas, AWS General
# Reference), 100 by default; a job of fewer records is refused as a whole.
MIN_RECORDS: Final = 100
MAX_RECORDS: Final = 50_000


def anthropic_body(
    extractor: BedrockExtractor, text: str
) -> tuple[dict[str, Any], Truncation | None]:
    """The InvokeModel body (Anthropic Messages) of one invoice, static part first."""
    sent, truncation = apply_budget(
        text, max_chars=extractor.max_chars, max_pages=extractor.max_pages
    )
    body = {
        "anthropic_version": ANTHROPIC_VERSION,
        "max_tokens": extractor._max_output_tokens,
        "temperature": extractor._temperature,
        "system": [
            {"type": "text", "text": BEDROCK_SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}
        ],
        "tools": [
            {
                "name": TOOL_NAME,
                "description": "Record the structured fields of the invoice.",
                "input_schema": LLM_SCHEMA,
            }
        ],
        "tool_choice": {"type": "tool", "name": TOOL_NAME},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": user_message(sent, len(sent))}]}
        ],
    }
    return body, truncation


def anthropic_extraction(
    extractor: BedrockExtractor,
    output: Mapping[str, Any],
    *,
    truncation: Truncation | None = None,
    notes: Sequence[str] = (),
) -> Extraction:
    """The `Extraction` of one Anthropic Messages answer from a batch, at batch prices.
    An unusable answer is a transient failure: an online retry has a repair turn."""
    reported = output.get("usage") or {}
    read = int(reported.get("cache_read_input_tokens", 0) or 0)
    written = int(reported.get("cache_creation_input_tokens", 0) or 0)
    usage = Usage(
        prompt_tokens=int(reported.get("input_tokens", 0)) + read + written,
        completion_tokens=int(reported.get("output_tokens", 0)),
        cached_tokens=read,
        cache_write_tokens=written,
    )

    def tool_input() -> str | dict[str, Any]:
        answer = next(
            (
                block.get("input")
                for block in output.get("content") or []
                if block.get("type") == "tool_use" and block.get("name") == TOOL_NAME
            ),
            None,
        )
        if answer is None:
            raise ExtractionError("invalid_json", "batch answer has no tool call", transient=True)
        return answer

    return batch_answer_extraction(
        extractor, tool_input, strict=False, usage=usage, truncation=truncation, notes=notes
    )


class BedrockBatchExtractor:
    """`BatchExtractor` (invoiceflow.batch) over a `BedrockExtractor`."""

    def __init__(self, extractor: BedrockExtractor) -> None:
        self.extractor = extractor
        self.model = extractor.model

    def batch_body(
        self, text: str, *, images: Any = ()
    ) -> tuple[dict[str, Any], Truncation | None, list[str]]:
        notes = ["page images are not sent in Bedrock batches"] if images else []
        body, truncation = anthropic_body(self.extractor, text)
        return body, truncation, notes

    def batch_extraction(
        self, response_body: Mapping[str, Any], *, truncation: Truncation | None, notes: Any
    ) -> Extraction:
        return anthropic_extraction(
            self.extractor, response_body, truncation=truncation, notes=notes
        )


def job_name(submission_id: str) -> str:
    """The job name (and client request token) of a submission: letters, digits and
    hyphens, at most 63 characters."""
    return f"invoiceflow-{submission_id}"


class BedrockBatches:
    """Bedrock batch inference jobs, with input and output under ``s3_uri``."""

    provider = "bedrock"

    def __init__(
        self,
        extractor: BedrockExtractor,
        *,
        control_client: Any,
        s3_client: Any,
        s3_uri: str,
        role_arn: str,
        limits: BatchLimits | None = None,
        min_records: int = MIN_RECORDS,
    ) -> None:
        if not s3_uri.startswith("s3://"):
            raise ValueError(f"s3_uri must be s3://bucket/prefix/, not {s3_uri!r}")
        self.extractor = extractor
        self._control = control_client
        self._s3 = s3_client
        self.bucket, _, prefix = s3_uri.removeprefix("s3://").partition("/")
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.role_arn = role_arn
        limits = limits or BatchLimits(max_requests=MAX_RECORDS)
        self.limits = dataclasses.replace(limits, min_requests=min_records)
        self._count = 0

    def record_id(self, key: str) -> str:
        """Bedrock's recordId: short and alphanumeric, so not the invoice key."""
        self._count += 1
        return f"INV{self._count:08d}"

    @staticmethod
    def line(record_id: str, body: Mapping[str, Any]) -> bytes:
        return json.dumps({"recordId": record_id, "modelInput": body}).encode() + b"\n"

    async def submit(self, jsonl: bytes, submission_id: str, metadata: Mapping[str, str]) -> str:
        """Upload ``jsonl`` and start a job named after ``submission_id``; the job's ARN.
        The name is the client request token too, so a retried create makes no second
        job. Bedrock refuses jobs of fewer records than its per-model minimum."""
        name = job_name(submission_id)
        key = f"{self.prefix}{name}/input.jsonl"
        try:
            await asyncio.to_thread(self._s3.put_object, Bucket=self.bucket, Key=key, Body=jsonl)
            job = await asyncio.to_thread(
                self._control.create_model_invocation_job,
                jobName=name,
                roleArn=self.role_arn,
                modelId=self.extractor.model,
                clientRequestToken=name,
                inputDataConfig={
                    "s3InputDataConfig": {
                        "s3Uri": f"s3://{self.bucket}/{key}",
                        "s3InputFormat": "JSONL",
                    }
                },
                outputDataConfig={
                    "s3OutputDataConfig": {
                        "s3Uri": f"s3://{self.bucket}/{self.prefix}{name}/output/"
                    }
                },
            )
        except (ClientError, BotoCoreError) as exc:
            raise map_bedrock_error(exc) from exc
        log.info("submitted Bedrock batch job %s (%d bytes)", job["jobArn"], len(jsonl))
        return str(job["jobArn"])

    async def find(self, submission_id: str) -> str | None:
        """The ARN of the job named after ``submission_id``, if Bedrock has one."""
        name = job_name(submission_id)
        try:
            listed = await asyncio.to_thread(
                self._control.list_model_invocation_jobs, nameContains=name
            )
        except (ClientError, BotoCoreError) as exc:
            raise map_bedrock_error(exc) from exc
        return next(
            (
                str(job["jobArn"])
                for job in listed.get("invocationJobSummaries", [])
                if job.get("jobName") == name
            ),
            None,
        )

    async def state(self, batch_id: str) -> BatchState:
        try:
            job = await asyncio.to_thread(
                self._control.get_model_invocation_job, jobIdentifier=batch_id
            )
        except (ClientError, BotoCoreError) as exc:
            raise map_bedrock_error(exc) from exc
        output = job["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"]
        job_id = batch_id.rsplit("/", 1)[-1]
        return BatchState(
            batch_id,
            _STATES.get(job["status"], "in_progress"),
            output_file_id=f"{output.rstrip('/')}/{job_id}/",
            errors=str(job.get("message") or ""),
        )

    async def results(self, state: BatchState) -> dict[str, LineResult]:
        found: dict[str, LineResult] = {}
        if not state.output_file_id:
            return found
        bucket, _, prefix = state.output_file_id.removeprefix("s3://").partition("/")
        listed = await asyncio.to_thread(self._s3.list_objects_v2, Bucket=bucket, Prefix=prefix)
        for obj in listed.get("Contents", []):
            if not obj["Key"].endswith(".jsonl.out"):
                continue  # manifest.json.out holds counts only
            body = await asyncio.to_thread(self._s3.get_object, Bucket=bucket, Key=obj["Key"])
            for raw in body["Body"].read().splitlines():
                if raw.strip():
                    record_id, result = _record_result(json.loads(raw))
                    found[record_id] = result
        return found


def _record_result(record: Mapping[str, Any]) -> tuple[str, LineResult]:
    record_id = str(record.get("recordId"))
    output = record.get("modelOutput")
    if isinstance(output, Mapping):
        return record_id, output
    error = record.get("error") or {}
    code = error.get("errorCode", "unknown")
    message = f"batch record failed ({code}): {error.get('errorMessage') or 'no message'}"
    return record_id, ExtractionError("batch_line_failed", message, transient=True)
