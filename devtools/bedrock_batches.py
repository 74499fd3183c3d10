"""Bedrock batch inference for the loopback Bedrock server (`devtools.bedrock_server`).

* ``POST /model-invocation-job`` (boto3 ``bedrock`` client,
  ``create_model_invocation_job``) reads the JSONL input from S3 (the server's
  ``s3_endpoint``, e.g. moto). Each record is ``{"recordId", "modelInput"}``, with
  ``modelInput`` an Anthropic Messages body. The server checks the records (at least
  ``min_records``), counts them in ``_stats`` ``batch_lines`` and answers ``{"jobArn"}``.
  A repeated ``clientRequestToken`` returns the first job.
* ``GET /model-invocation-job/{arn}``: once ``delay_s`` has passed, the job is answered
  once. Each record gets a tool-use answer from the server's answer rules, with usage
  (``input_tokens`` leaves out what the ``cache_control`` system text read from or wrote
  to the prompt cache). The answers are written to
  ``<output s3Uri>/<job id>/input.jsonl.out``. Records matching a ``fail`` needle get
  ``{"error": {"errorCode": 500, ...}}``. With ``expire`` on, the job ends ``Expired``
  with no output.

* ``GET /model-invocation-jobs`` (``list_model_invocation_jobs``) lists the jobs whose
  name contains ``nameContains``, newest first, in one page.

Control: ``POST /_control/batches`` ``{"delay_s", "fail", "expire", "min_records",
"stall_create_s"}``; ``stall_create_s`` holds the answer to a create after the job was
accepted (its records counted), so a crash test can kill the client in between.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devtools.openai_batches import stall

if TYPE_CHECKING:
    from devtools.bedrock_server import BedrockServer

ARN_PREFIX = "arn:aws:bedrock:eu-central-1:000000000000:model-invocation-job/"


@dataclass
class _Job:
    arn: str
    name: str
    model_id: str
    input_uri: str
    output_uri: str
    records: list[dict[str, Any]]
    started: float
    status: str = "InProgress"
    message: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def describe(self) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "jobArn": self.arn,
            "jobName": self.name,
            "modelId": self.model_id,
            "roleArn": "arn:aws:iam::000000000000:role/loopback",
            "status": self.status,
            "message": self.message,
            "submitTime": now,
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": self.input_uri}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": self.output_uri}},
            "totalRecordCount": len(self.records),
        }


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


class BedrockJobs:
    """Model-invocation jobs of one loopback Bedrock server."""

    def __init__(self, server: BedrockServer, s3_endpoint: str | None) -> None:
        self.server = server
        self.s3_endpoint = s3_endpoint
        self.reset()

    def reset(self) -> None:
        self.jobs: dict[str, _Job] = {}
        self.tokens: dict[str, str] = {}
        self.delay_s = 0.0
        self.fail: list[str] = []
        self.expire = False
        self.min_records = 1
        self.stall_create_s = 0.0
        # Set by the next control update or reset: stalled answers go out at once.
        if (stalled := getattr(self, "unstalled", None)) is not None:
            stalled.set()
        self.unstalled = asyncio.Event()
        self.lines_received = 0

    def stats(self) -> dict[str, Any]:
        return {"batches": len(self.jobs), "batch_lines": self.lines_received}

    def routes(self) -> list[Route]:
        return [
            Route("/model-invocation-job", self.create, methods=["POST"]),
            Route("/model-invocation-jobs", self.list, methods=["GET"]),
            Route("/model-invocation-job/{arn:path}", self.get, methods=["GET"]),
            Route("/_control/batches", self.control, methods=["POST"]),
        ]

    def _s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="loopback",
            aws_secret_access_key="loopback",
        )

    async def create(self, request: Request) -> Response:
        if (denied := self.server._sigv4_error(request)) is not None:
            return denied
        body = json.loads(await request.body() or b"{}")
        token = body.get("clientRequestToken")
        if token in self.tokens:  # idempotent, like the API
            return JSONResponse({"jobArn": self.tokens[token]})
        input_uri = body["inputDataConfig"]["s3InputDataConfig"]["s3Uri"]
        bucket, key = _split_uri(input_uri)
        raw = await asyncio.to_thread(
            lambda: self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        )
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if len(records) < self.min_records:
            message = f"a job needs at least {self.min_records} records, got {len(records)}"
            return JSONResponse({"message": message}, status_code=400,
                                headers={"x-amzn-ErrorType": "ValidationException"})  # fmt: skip
        arn = ARN_PREFIX + uuid.uuid4().hex[:12]
        output = body["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"]
        self.jobs[arn] = _Job(arn, body["jobName"], body["modelId"], input_uri, output, records,
                              time.monotonic())  # fmt: skip
        if token:
            self.tokens[token] = arn
        self.server.total += len(records)
        self.lines_received += len(records)
        await stall(self.stall_create_s, self.unstalled)  # accepted: a client killed now is billed
        return JSONResponse({"jobArn": arn})

    async def list(self, request: Request) -> Response:
        if (denied := self.server._sigv4_error(request)) is not None:
            return denied
        needle = request.query_params.get("nameContains", "")
        jobs = sorted(self.jobs.values(), key=lambda j: j.started, reverse=True)
        summaries = [job.describe() for job in jobs if needle in job.name]
        return JSONResponse({"invocationJobSummaries": summaries})

    async def get(self, request: Request) -> Response:
        if (denied := self.server._sigv4_error(request)) is not None:
            return denied
        job = self.jobs.get(request.path_params["arn"])
        if job is None:
            return JSONResponse(
                {"message": "no such job"},
                status_code=404,
                headers={"x-amzn-ErrorType": "ResourceNotFoundException"},
            )
        async with job.lock:
            if job.status == "InProgress" and time.monotonic() - job.started >= self.delay_s:
                await self._finish(job)
        return JSONResponse(job.describe())

    async def control(self, request: Request) -> Response:
        update = json.loads(await request.body() or b"{}")
        self.delay_s = float(update.get("delay_s", self.delay_s))
        self.fail = list(update.get("fail", self.fail))
        self.expire = bool(update.get("expire", self.expire))
        self.min_records = int(update.get("min_records", self.min_records))
        self.stall_create_s = float(update.get("stall_create_s", self.stall_create_s))
        self.unstalled.set()
        self.unstalled = asyncio.Event()
        return JSONResponse({"delay_s": self.delay_s, "fail": self.fail, "expire": self.expire,
                             "min_records": self.min_records,
                             "stall_create_s": self.stall_create_s})  # fmt: skip

    async def _finish(self, job: _Job) -> None:
        if self.expire:
            job.status, job.message = "Expired", "the job expired before it ran"
            return
        lines = [await self._answer(record) for record in job.records]
        bucket, prefix = _split_uri(job.output_uri)
        key = f"{prefix.rstrip('/')}/{job.arn.rsplit('/', 1)[-1]}/input.jsonl.out"
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        await asyncio.to_thread(lambda: self._s3().put_object(Bucket=bucket, Key=key, Body=body))
        failed = sum("error" in line for line in lines)
        job.status = "PartiallyCompleted" if failed else "Completed"

    async def _answer(self, record: dict[str, Any]) -> dict[str, Any]:
        from devtools.bedrock_server import INVOICE_OPEN, invoice_text_of

        model_input = record["modelInput"]
        user = "".join(
            block.get("text", "")
            for message in model_input.get("messages", [])
            if message.get("role") == "user"
            for block in message.get("content", [])
        )
        if any(needle in user for needle in self.fail):
            error = {"errorCode": 500, "errorMessage": "scripted record failure"}
            return {"recordId": record["recordId"], "modelInput": model_input, "error": error}
        text = invoice_text_of(user) if INVOICE_OPEN in user else user
        answer, _ = await self.server._scripted(user, text)
        static = "".join(b.get("text", "") for b in model_input.get("system", [])
                         if "cache_control" in b)  # fmt: skip
        read, written = self.server.prompt_cache.static_hit(static) if static else (0, 0)
        system = "".join(b.get("text", "") for b in model_input.get("system", []))
        prompt = math.ceil((len(system) + len(user)) / 4)
        output = {
            "id": f"msg_{uuid.uuid4().hex[:20]}",
            "type": "message",
            "role": "assistant",
            "model": "loopback",
            "content": [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}",
                         "name": model_input["tool_choice"]["name"], "input": answer}],
            "stop_reason": "tool_use",
            "usage": {
                "input_tokens": prompt - read - written,
                "output_tokens": math.ceil(len(json.dumps(answer)) / 4),
                "cache_read_input_tokens": read,
                "cache_creation_input_tokens": written,
            },
        }  # fmt: skip
        return {"recordId": record["recordId"], "modelInput": model_input, "modelOutput": output}
