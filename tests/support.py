"""What the end-to-end tests share: real servers, flow runs, workers, and the invariants.

Everything talks to the session's real Prefect server (conftest's `local_stack`) and
moto, the way an operator would. Sections: documents (good and bad invoice PDFs); S3 and
the manifest (clients straight to moto, uploads, read-only manifest access); blocks and
flow runs (in this process, in a child process as a worker starts them, or through a
deployment and `invoiceflow worker`); and the three invariants every fault case ends
with, `assert_invariants`:

1. no lost manifest update: every listed invoice has an entry, in a final state
   (done/failed) consistent with what happened;
2. the manifest and the result objects agree: every `done` entry's result exists and
   names the same source key and ETag, and no result exists for an invoice that is not
   done (unless the case explains why);
3. no re-billing: no invoice that was done before the retry reached the LLM again,
   counted at the loopback LLM server by `X-Invoice-Key`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from fpdf import FPDF
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import Artifact, FlowRun, StateType
from prefect.states import State
from pydantic import SecretStr
from pypdf import PdfWriter

from invoiceflow.manifest import ManifestStore, Status
from invoiceflow.samples import generate_corpus
from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import S3Store, make_s3_client

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = REPO_ROOT / "test-output"
FINAL = {Status.done.value, Status.failed.value, Status.gave_up.value}


# -- documents -----------------------------------------------------------------------


def good_invoices(n: int, seed: int = 11) -> list[tuple[str, bytes]]:
    return [(stem, pdf) for stem, pdf, _ in generate_corpus(n, seed=seed)]


def text_pdf(pages: int) -> bytes:
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for page in range(pages):
        pdf.add_page()
        pdf.cell(0, 8, f"Invoice INV-{page:04d} page {page + 1}: consulting services rendered")
    return bytes(pdf.output())


def encrypted(data: bytes, *, user_password: str, owner_password: str = "owner") -> bytes:
    writer = PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt(user_password=user_password, owner_password=owner_password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def scanned_pdf() -> bytes:
    """A page with only a filled shape on it: what a scan without OCR looks like."""
    pdf = FPDF()
    pdf.add_page()
    pdf.set_fill_color(60, 60, 60)
    pdf.rect(15, 15, 180, 260, style="F")
    return bytes(pdf.output())


def zero_page_pdf() -> bytes:
    out = io.BytesIO()
    PdfWriter().write(out)
    return out.getvalue()


@dataclass(frozen=True)
class BadInput:
    name: str
    data: bytes
    kind: str
    """The error kind the manifest must record."""
    message_words: tuple[str, ...] = ()
    """Words the human-readable message must contain."""


# The limits the bad-input run uses; small, so the oversized cases stay small.
MAX_PAGES = 3
MAX_PDF_BYTES = 150_000


def bad_inputs() -> list[BadInput]:
    good = good_invoices(1, seed=101)[0][1]
    return [
        BadInput("not-a-pdf.pdf", b"Dear customer,\nplease find attached...\n" * 20, "not_pdf",
                 ("%PDF-",)),
        BadInput("empty.pdf", b"", "empty", ("0 bytes",)),
        BadInput("truncated.pdf", good[: len(good) * 3 // 5], "corrupt"),
        BadInput("password.pdf", encrypted(good, user_password="s3cret"), "encrypted",
                 ("password",)),
        # No text layer: OCR runs now (issue 9) and finds nothing on a filled shape.
        BadInput("scan.pdf", scanned_pdf(), "ocr_failed", ("OCR",)),
        BadInput("long.pdf", text_pdf(MAX_PAGES + 2), "too_many_pages",
                 (str(MAX_PAGES + 2), f"limit is {MAX_PAGES}")),
        # Valid PDF, padded past the byte limit with a trailing comment.
        BadInput("huge.pdf", good + b"\n%" + b"x" * MAX_PDF_BYTES, "too_large",
                 (str(MAX_PDF_BYTES),)),
        BadInput("zero-pages.pdf", zero_page_pdf(), "no_pages", ("no pages",)),
    ]  # fmt: skip


def tracking_number_invoice() -> bytes:
    """A plain invoice that also prints a 29-digit parcel tracking number."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    pdf.add_page()
    for line in (
        "Nordlicht Versand GmbH",
        "VAT ID: DE123456789",
        "Invoice number: NV-2026-0042",
        "Invoice date: 2026-03-14",
        "Sendungsnr 12345678901234567890123456789",
        "Parcel handling   1   40.00   40.00",
        "Subtotal: 40.00 EUR",
        "VAT 19%: 7.60 EUR",
        "Total: 47.60 EUR",
    ):
        pdf.cell(0, 7, line, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def owner_only_encrypted_invoice() -> bytes:
    """Encrypted, but the user password is empty: it must open and be extracted."""
    return encrypted(good_invoices(1, seed=102)[0][1], user_password="")


# -- S3 and the manifest ---------------------------------------------------------------


def direct_s3(endpoint: str, bucket: str) -> S3Store:
    """A client straight to moto (no proxy): what the assertions read through."""
    client = make_s3_client(endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x")
    return S3Store(client, bucket)


OPERATOR_AGENT = "invoiceflow-operator"


def operator_s3(endpoint: str, bucket: str) -> S3Store:
    """A client whose requests the fault proxy can tell apart (by its User-Agent)."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(
            retries={"mode": "standard", "max_attempts": 8},
            s3={"addressing_style": "path"},
            user_agent_extra=OPERATOR_AGENT,
        ),
    )
    return S3Store(client, bucket)


def _read_only_lock() -> Any:
    raise AssertionError("the fault tests only read the manifest through this store")


def manifest_entries(s3: S3Store, key: str) -> dict[str, dict[str, Any]]:
    return ManifestStore(s3, key, lock=_read_only_lock).read_sync().entries


def list_keys(s3: S3Store, prefix: str) -> set[str]:
    paginator = s3.client.get_paginator("list_objects_v2")
    return {
        obj["Key"]
        for page in paginator.paginate(Bucket=s3.bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    }


def upload(s3: S3Store, prefix: str, docs: Iterable[tuple[str, bytes]]) -> set[str]:
    keys = set()
    for name, data in docs:
        key = f"{prefix}{name}" if name.endswith(".pdf") else f"{prefix}{name}.pdf"
        s3.put(key, data, content_type="application/pdf")
        keys.add(key)
    return keys


def upload_invoices(s3: S3Store, prefix: str, n: int, seed: int = 11) -> list[str]:
    return sorted(upload(s3, prefix, good_invoices(n, seed=seed)))


# -- flow parameters and runs ----------------------------------------------------------


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def flow_params(prefix: str, lock: str, **extra: Any) -> dict[str, Any]:
    """Parameters of one fault case: its own manifest, results prefix and lock."""
    return {
        "source_prefix": prefix,
        "manifest_key": f"manifests/{prefix.rstrip('/')}.json",
        "results_prefix": f"results/{prefix}",
        "manifest_lock": lock,
        "max_llm_concurrency": 8,
        "commit_interval_s": 0.2,
        **extra,
    }


async def create_lock(name: str) -> str:
    """A manifest lock of the case's own, so a slot a case leaves held blocks only it."""
    from flows.lock import ensure_manifest_lock

    await ensure_manifest_lock(name)
    return name


def save_llm_block(
    base_url: str,
    api_key: str,
    *,
    name: str | None = None,
    timeout_s: float = 10,
    max_retries: int = 4,
    vision: str = "never",
) -> str:
    """An OpenAI-kind extractor block on the loopback LLM; returns its name.

    Scans go through OCR (`vision="never"`) unless a test asks for page images.

    Saved synchronously, so async tests and sync ones (Playwright's sync API runs a loop
    of its own) call it alike.
    """
    from blocks.extractor import ExtractorBlock

    name = name or unique("llm")
    ExtractorBlock(
        kind="openai",
        base_url=base_url,
        model="test-model",
        api_key=SecretStr(api_key),
        timeout_s=timeout_s,
        max_retries=max_retries,
        vision=vision,
    ).save(name, overwrite=True, _sync=True)
    return name


async def save_bucket_block(endpoint_url: str, bucket: str, *, max_attempts: int = 8) -> str:
    """An S3Bucket block pointing at `endpoint_url`, with botocore's standard retries.

    The client configuration is the provisioned one (`flows.provision.S3_CLIENT_CONFIG`:
    standard mode, 8 attempts); `max_attempts` lowers it to stage an outage that
    outlasts the retries without waiting out eight backoffs.
    """
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    from flows.provision import S3_CLIENT_CONFIG

    config = {**S3_CLIENT_CONFIG, "retries": {"mode": "standard", "max_attempts": max_attempts}}
    credentials = AwsCredentials(
        aws_access_key_id="invoiceflow-local",
        aws_secret_access_key=SecretStr("invoiceflow-local"),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint_url, config=config),
    )
    await credentials.save(unique("aws"))
    name = unique("bucket")
    await S3Bucket(bucket_name=bucket, credentials=credentials).save(name)
    return name


async def run_flow(params: Mapping[str, Any]) -> Any:
    """Run the flow in this process; returns its summary, or the exception it ended with."""
    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    try:
        return await process_invoices(ProcessInvoicesParams(**params))
    except Exception as exc:  # InvoicesFailed or a crash: the case asserts which
        return exc


async def create_flow_run(params: Mapping[str, Any]) -> uuid.UUID:
    """A flow run record on the server, to be executed by `execute_flow_run`."""
    from prefect.client.orchestration import get_client

    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    parameters = {"params": ProcessInvoicesParams(**params).model_dump(mode="json")}
    async with get_client() as client:
        run = await client.create_flow_run(process_invoices, parameters=parameters)
    return run.id


def execute_flow_run(
    flow_run_id: uuid.UUID, env: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Execute an existing flow run in a child process, the way a worker does.

    `python -m prefect.flow_engine ENTRYPOINT` with PREFECT__FLOW_RUN_ID is the
    command Prefect's process workers and runners start; executing the same id again
    is what Retry in the UI leads to.
    """
    child_env = {
        **os.environ,
        **env,
        "PREFECT__FLOW_RUN_ID": str(flow_run_id),
        "PYTHONPATH": str(REPO_ROOT),
    }
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "prefect.flow_engine", "flows/process_invoices.py:process_invoices"],
        cwd=REPO_ROOT,
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


async def run_flow_by_engine(flow_run: Any) -> Any:
    """Execute an existing flow run in this process, as a worker's child process does."""
    from prefect.flow_engine import run_flow as engine_run_flow

    from flows.process_invoices import process_invoices

    return await engine_run_flow(process_invoices, flow_run=flow_run)


async def flow_run_state(flow_run_id: uuid.UUID) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_flow_run(flow_run_id)).state


async def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


# -- a dedicated stack whose Prefect server can be restarted ---------------------------


def restart_prefect_server(info: Any, *, down_s: float = 0.0) -> Any:
    """Stop the stack's Prefect server and start it again on the same port and home.

    The database and the lease storage (on disk, see `stack.server_env`) survive; the
    server's in-memory state does not. Returns the updated `StackInfo` (new pid,
    recorded in stack.json so `stack.down` stops the new server).
    """
    import dataclasses
    import time

    from invoiceflow import stack

    stack._stop(info.prefect_pid)
    time.sleep(down_s)
    home = info.prefect_home
    log = Path(info.state_dir) / "logs" / "prefect-server.log"
    pid = stack._spawn(
        [stack._bin("prefect"), "server", "start", "--host", "127.0.0.1",
         "--port", str(info.prefect_port)],
        log,
        {**stack.server_env(home), "PREFECT_API_URL": info.api_url,
         "PREFECT_SERVER_UI_API_URL": info.api_url},
        # Started from a worker thread: a parent-death signal would fire when that
        # thread ends, not when the test process does. The fixture's down() stops it.
        die_with_parent=False,
    )  # fmt: skip
    restarted = dataclasses.replace(info, prefect_pid=pid)
    (Path(info.state_dir) / "stack.json").write_text(json.dumps(dataclasses.asdict(restarted)))
    stack._wait_healthy(f"{info.api_url}/health", pid, log, 180)
    return restarted


# -- the three invariants --------------------------------------------------------------


@dataclass
class InvariantReport:
    entries: dict[str, dict[str, Any]]
    done: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)

    def errors(self) -> dict[str, tuple[str | None, bool | None]]:
        return {
            k: (self.entries[k].get("error_kind"), self.entries[k].get("transient"))
            for k in self.failed
        }


def assert_invariants(
    s3: S3Store,
    params: Mapping[str, Any],
    listed: set[str],
    *,
    done_before_retry: set[str] = frozenset(),  # type: ignore[assignment]
    llm_by_key_before_retry: Mapping[str, int] | None = None,
    llm_by_key_now: Mapping[str, int] | None = None,
    results_explained: set[str] = frozenset(),  # type: ignore[assignment]
    manifest_key: str | None = None,
) -> InvariantReport:
    entries = manifest_entries(s3, manifest_key or params["manifest_key"])
    # 1. Nothing lost: every listed invoice has an entry in a final state.
    missing = listed - set(entries)
    assert not missing, f"lost manifest updates: no entry for {sorted(missing)}"
    unfinished = {k: entries[k]["status"] for k in listed if entries[k]["status"] not in FINAL}
    assert not unfinished, f"invoices left unfinished: {unfinished}"
    report = InvariantReport(entries)
    for key in listed:
        entry = entries[key]
        if entry["status"] == Status.done:
            report.done.add(key)
        else:
            report.failed.add(key)
            assert entry.get("error_kind"), f"{key} failed without an error kind"
            assert entry.get("error_message"), f"{key} failed without a message"

    # 2. The manifest and the result objects agree.
    results_prefix = params["results_prefix"]
    result_keys = list_keys(s3, results_prefix)
    done_result_keys = set()
    for key in report.done:
        rkey = entries[key].get("result_key")
        assert rkey and rkey.startswith(results_prefix), (key, rkey)
        assert rkey in result_keys, f"{key} is done but its result {rkey} does not exist"
        result = ExtractionResult.model_validate_json(s3.get(rkey).body)
        assert result.source_key == key, f"{rkey} holds {result.source_key}, not {key}"
        assert result.source_etag == entries[key]["source_etag"], (key, "stale result")
        done_result_keys.add(rkey)
    unexplained = result_keys - done_result_keys - results_explained
    assert not unexplained, f"results without a done manifest entry: {sorted(unexplained)}"

    # 3. Nothing done before the retry reached the LLM again.
    if llm_by_key_before_retry is not None and llm_by_key_now is not None:
        rebilled = {
            k: (llm_by_key_before_retry.get(k, 0), llm_by_key_now.get(k, 0))
            for k in done_before_retry
            if llm_by_key_now.get(k, 0) != llm_by_key_before_retry.get(k, 0)
        }
        assert not rebilled, f"done invoices sent to the LLM again (before, after): {rebilled}"
    return report


def done_keys(s3: S3Store, manifest_key: str) -> set[str]:
    return {k for k, e in manifest_entries(s3, manifest_key).items() if e["status"] == "done"}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)


# -- deployments, workers and what the UI shows ---------------------------------------


PROCESS_INVOICES = "process-invoices/process-invoices"
REPROCESS_FAILED = "process-invoices/reprocess-failed"
WORK_POOL = "invoices"
# Flow runs start in a fresh Python process on a loaded 2-core machine: be patient.
RUN_TIMEOUT_S = 300
FINAL_STATES = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def client() -> SyncPrefectClient:
    return get_client(sync_client=True)


def _run(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=env or dict(os.environ), stdout=out, stderr=out
        )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{log.read_text()[-4000:]}"


def deploy_with_cli(log: Path) -> None:
    """What `make deploy` runs once the stack is up: `invoiceflow deploy`."""
    _run([sys.executable, "-m", "flows.cli", "deploy"], log)


def deploy_prefect_file(prefect_file: Path, log: Path) -> None:
    """`prefect --no-prompt deploy --all` for another prefect.yaml, from the repo root."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    _run([*command, "--prefect-file", str(prefect_file)], log)


def pause_schedules(deployment_id: UUID) -> None:
    """Stop a deployment's schedules and drop the runs they already scheduled.

    The hourly schedule of the real prefect.yaml would otherwise hand a worker an extra
    run whenever a test happens to cross the top of the hour.
    """
    with client() as c:
        for schedule in c.read_deployment_schedules(deployment_id):
            c.update_deployment_schedule(deployment_id, schedule.id, active=False)
        # The recent-deployments scheduler may have been mid-pass: sweep once more.
        for run in scheduled_runs(c, deployment_id):
            c.delete_flow_run(run.id)


def scheduled_runs(c: SyncPrefectClient, deployment_id: UUID) -> list[FlowRun]:
    return c.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
    )


def runs_of(deployment_id: UUID) -> list[FlowRun]:
    with client() as c:
        return c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


class Worker:
    """`invoiceflow worker` as an operator starts it, in its own process group."""

    def __init__(self, log: Path, pool: str = WORK_POOL, limit: int = 1) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        env = {
            **os.environ,
            # Poll every second instead of every 10 s: tests wait for the worker.
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            # Flow-run processes log to the API; keep the worker's own output readable.
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        command = [sys.executable, "-m", "flows.cli", "worker", "--pool", pool]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*command, "--limit", str(limit)],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The worker shuts down on SIGINT (Ctrl-C); it ignores a plain SIGTERM.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        # Flow-run subprocesses share the group; none may outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def running_worker(log: Path, pool: str = WORK_POOL, limit: int = 1) -> Iterator[Worker]:
    worker = Worker(log, pool=pool, limit=limit)
    try:
        yield worker
    finally:
        worker.stop()


def create_run(deployment_name: str, params: dict[str, Any]) -> FlowRun:
    """A flow run of the deployment, like `prefect deployment run` or the API would."""
    with client() as c:
        deployment = c.read_deployment_by_name(deployment_name)
        return c.create_flow_run_from_deployment(deployment.id, parameters={"params": params})


def find_run_by_name(deployment_id: UUID, name: str) -> FlowRun:
    with client() as c:
        runs = c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
        )
    assert len(runs) == 1, f"expected one flow run named {name!r}, found {len(runs)}"
    return runs[0]


def wait_for_final_state(
    flow_run_id: UUID, worker: Worker | None = None, timeout_s: float = RUN_TIMEOUT_S
) -> FlowRun:
    """Poll until the run is Completed/Failed/Crashed/Cancelled."""
    deadline = time.monotonic() + timeout_s
    with client() as c:
        while True:
            run = c.read_flow_run(flow_run_id)
            if run.state is not None and run.state.type in FINAL_STATES:
                return run
            if worker is not None and not worker.alive():
                raise AssertionError(f"the worker died:\n{worker.tail()}")
            if time.monotonic() > deadline:
                state = run.state.name if run.state else None
                detail = worker.tail() if worker is not None else ""
                raise AssertionError(
                    f"flow run {flow_run_id} still {state} after {timeout_s:.0f}s\n{detail}"
                )
            time.sleep(1)


def retry_like_the_ui(flow_run_id: UUID) -> None:
    """What the UI's Retry button sends (`retryFlowRun` in the UI bundle)."""
    with client() as c:
        result = c.set_flow_run_state(
            flow_run_id,
            State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"),
            force=False,
        )
    assert result.status.value == "ACCEPT", result


def artifacts_of(flow_run_id: UUID) -> dict[str, Artifact]:
    with client() as c:
        artifacts = c.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts if a.key}


def fail_llm_for(keys: list[str]) -> list[dict[str, Any]]:
    """Fault rules: HTTP 500 for every request about these invoices, until cleared."""
    return [{"match": key, "status": 500, "times": -1} for key in keys]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
