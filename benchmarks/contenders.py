"""One benchmark contender, run in a process of its own so its CPU and RSS are its own.

    python -m benchmarks.contenders '<ContenderSpec as JSON>'

The parent (`benchmarks.run`) sets the stack's environment (PREFECT_API_URL, AWS keys)
and passes the LLM API key as ``BENCH_LLM_API_KEY`` (never on the command line). The
last stdout line is ``BENCH-RESULT <ContenderReport as JSON>``; everything else (Prefect's
console logs) goes to stderr, which the parent keeps for the failure report.

Contenders:

``seed``
    The seed's design without Prefect: ``asyncio.gather`` over the invoices, pypdf in
    ``loop.run_in_executor``, the LLM behind a semaphore of size C, and one plain
    read-modify-write of the manifest per invoice under an ``asyncio.Lock`` (the domain's
    `ManifestStore` with an asyncio.Lock factory, one update per commit).
``naive``
    The real flow with ``commit_interval_s=0, max_commit_batch=1``: the Prefect slot is
    taken once per manifest update.
``pipeline``
    The real flow with its default commit settings.

Measured here, from the first line of the run to the last flushed log and event: wall
time, CPU time of this process and its children (`resource.getrusage`, so every thread
counts), and peak RSS (``ru_maxrss``, the whole process life). Imports (Prefect's take
a few seconds) happen before the clock starts and are reported apart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from invoiceflow import defaults

ContenderName = Literal["seed", "naive", "pipeline"]
RESULT_PREFIX = "BENCH-RESULT "
API_KEY_ENV = "BENCH_LLM_API_KEY"


class ContenderSpec(BaseModel):
    """What the parent tells a contender process to do."""

    contender: ContenderName
    n: int
    concurrency: int
    source_prefix: str
    results_prefix: str
    manifest_key: str
    # seed: talks to S3 and the LLM directly
    bucket: str
    s3_endpoint: str
    llm_base_url: str
    # Prefect contenders: block and lock names on the bench's own server
    bucket_block: str = defaults.BUCKET_BLOCK
    extractor_block: str = defaults.EXTRACTOR_BLOCK
    manifest_lock: str = defaults.MANIFEST_LOCK
    flow_overrides: dict[str, Any] = {}


class ContenderReport(BaseModel):
    """What a contender process reports back (one JSON line)."""

    contender: ContenderName
    ok: bool
    wall_s: float
    cpu_user_s: float
    cpu_system_s: float
    cpu_children_s: float
    process_cpu_s: float
    import_wall_s: float = 0.0
    import_cpu_s: float = 0.0
    peak_rss_mb: float
    # time.monotonic() when the run started (after imports): on Linux the same clock as
    # the LLM server's, so the harness can tell when the first LLM call arrived.
    started_monotonic: float = 0.0
    # time.monotonic() when the flow run entered Running (its on_running hook), just
    # before Prefect called the flow function; Prefect contenders only.
    flow_started_monotonic: float | None = None
    summary: dict[str, Any] = {}
    store_writes: int | None = None
    store_lock_acquisitions: int | None = None
    store_conflicts: int | None = None
    error: str | None = None

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_system_s + self.cpu_children_s


@dataclass(frozen=True)
class _Usage:
    user: float
    system: float
    children: float

    @classmethod
    def now(cls) -> _Usage:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(own.ru_utime, own.ru_stime, kids.ru_utime + kids.ru_stime)


# ---------------------------------------------------------------- the seed design


@dataclass(frozen=True)
class RecordOutcome:
    """The seed's manifest update: overwrite the invoice's entry with its final status.

    A plain read-modify-write, one per invoice, as the seed did; it satisfies the
    domain's `Update` protocol so `ManifestStore` (lock + conditional write) applies it.
    """

    key: str
    source_etag: str
    status: str
    fields: dict[str, Any]

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Any:
        from invoiceflow.manifest import ManifestEntry, Outcome

        prev = entries.get(self.key)
        attempts = int(prev["attempts"]) + 1 if prev else 1
        entries[self.key] = ManifestEntry(
            status=self.status,
            source_etag=self.source_etag,
            attempts=attempts,
            run_id="seed",
            created_at=prev["created_at"] if prev else now,
            updated_at=now,
            **self.fields,
        ).model_dump(mode="json")
        return Outcome(True, attempts)


async def run_seed(spec: ContenderSpec) -> dict[str, Any]:
    from invoiceflow.extractors import ExtractionError
    from invoiceflow.extractors.openai import OpenAIExtractor
    from invoiceflow.manifest import ManifestStore
    from invoiceflow.pdf import PdfError, parse_pdf
    from invoiceflow.schema import ExtractionResult
    from invoiceflow.storage import ListedObject, S3Store, invoice_id, make_s3_client, result_key

    s3 = S3Store(
        make_s3_client(
            endpoint_url=spec.s3_endpoint,
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "bench"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "bench"),
            max_pool_connections=max(64, spec.concurrency * 2),
        ),
        spec.bucket,
    )
    manifest_lock = asyncio.Lock()
    store = ManifestStore(s3, spec.manifest_key, lock=lambda: manifest_lock)
    extractor = OpenAIExtractor(
        base_url=spec.llm_base_url,
        api_key=os.environ[API_KEY_ENV],
        max_retries=4,
        max_connections=max(64, spec.concurrency),
    )
    llm_slots = asyncio.Semaphore(spec.concurrency)
    loop = asyncio.get_running_loop()

    def download_and_parse(obj: ListedObject) -> tuple[str, int]:
        body, _etag = s3.get(obj.key)
        parsed = parse_pdf(body)
        return parsed.text, parsed.pages

    async def process(obj: ListedObject) -> str:
        try:
            text, pages = await loop.run_in_executor(None, download_and_parse, obj)
            async with llm_slots:
                invoice, _usage = await extractor.extract_with_usage(text, invoice_key=obj.key)
        except (PdfError, ExtractionError) as exc:
            kind = getattr(exc, "kind", type(exc).__name__)
            await store.commit(
                [
                    RecordOutcome(
                        obj.key,
                        obj.etag,
                        "failed",
                        {"error_kind": str(kind), "error_message": str(exc)[:500]},
                    )
                ]
            )
            return "failed"
        key = result_key(spec.results_prefix, invoice_id(obj.key, spec.source_prefix))
        result = ExtractionResult(
            source_key=obj.key,
            source_etag=obj.etag,
            extractor=extractor.name,
            pages=pages,
            invoice=invoice,
            extracted_at=dt.datetime.now(dt.UTC),
        )
        await asyncio.to_thread(s3.put, key, result.model_dump_json(indent=2).encode())
        fields = {
            "result_key": key,
            "extractor": extractor.name,
            "vendor_name": invoice.vendor_name,
            "total": str(invoice.total) if invoice.total is not None else None,
            "currency": invoice.currency,
        }
        await store.commit([RecordOutcome(obj.key, obj.etag, "done", fields)])
        return "done"

    try:
        listed = await asyncio.to_thread(lambda: list(s3.list_sources(spec.source_prefix)))
        statuses = await asyncio.gather(*(process(obj) for obj in listed))
    finally:
        await extractor.aclose()
    return {
        "summary": {
            "processed": len(statuses),
            "done": statuses.count("done"),
            "failed": statuses.count("failed"),
        },
        "store_writes": store.writes,
        "store_lock_acquisitions": store.lock_acquisitions,
        "store_conflicts": store.conflicts,
    }


# ---------------------------------------------------------------- the Prefect flow


def run_flow(spec: ContenderSpec) -> dict[str, Any]:
    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    params = ProcessInvoicesParams(
        source_prefix=spec.source_prefix,
        results_prefix=spec.results_prefix,
        manifest_key=spec.manifest_key,
        bucket_block=spec.bucket_block,
        extractor_block=spec.extractor_block,
        manifest_lock=spec.manifest_lock,
        max_llm_concurrency=spec.concurrency,
        **spec.flow_overrides,
    )
    flow_started: list[float] = []
    flow = process_invoices.with_options(
        on_running=[lambda *_: flow_started.append(time.monotonic())]
    )
    try:
        summary = asyncio.run(flow(params))
    finally:
        _flush_prefect()
    return {
        "summary": summary.model_dump(include={"processed", "done", "failed"}),
        # Counted by the flow's ManifestStore where the slot is taken: exact, unlike
        # Prefect's batched, eventually consistent `concurrency-limit.acquired` events.
        "store_lock_acquisitions": summary.lock_acquisitions,
        "flow_started_monotonic": flow_started[0] if flow_started else None,
    }


def _flush_prefect() -> None:
    """Send queued run logs and events now, so their cost lands inside the measurement."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)
    EventsWorker.drain_all(timeout=60)


# ---------------------------------------------------------------- entry point


_MODULES: dict[str, tuple[str, ...]] = {
    "seed": (
        "invoiceflow.extractors.openai",
        "invoiceflow.manifest",
        "invoiceflow.pdf",
        "invoiceflow.schema",
        "invoiceflow.storage",
    ),
    "flow": (
        "flows.params",
        "flows.process_invoices",
        "prefect.events.worker",
        "prefect.logging.handlers",
    ),
}


def measure(spec: ContenderSpec) -> ContenderReport:
    """Run the contender; time and CPU start after its imports (reported apart)."""
    error: str | None = None
    detail: dict[str, Any] = {}
    import_start, import_usage = time.perf_counter(), _Usage.now()
    try:
        for module in _MODULES["seed" if spec.contender == "seed" else "flow"]:
            importlib.import_module(module)
    except Exception as exc:
        traceback.print_exc()
        error = f"import failed: {type(exc).__name__}: {exc}"[:2000]
    before = _Usage.now()
    start = time.perf_counter()
    started_monotonic = time.monotonic()
    import_cpu_s = before.user + before.system - import_usage.user - import_usage.system
    try:
        if error is not None:
            raise RuntimeError(error)
        detail = asyncio.run(run_seed(spec)) if spec.contender == "seed" else run_flow(spec)
    except Exception as exc:
        if error is None:
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"[:2000]
    wall = time.perf_counter() - start
    after = _Usage.now()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return ContenderReport(
        contender=spec.contender,
        ok=error is None,
        wall_s=wall,
        cpu_user_s=after.user - before.user,
        cpu_system_s=after.system - before.system,
        cpu_children_s=after.children - before.children,
        process_cpu_s=after.user + after.system + after.children,
        import_wall_s=start - import_start,
        import_cpu_s=import_cpu_s,
        peak_rss_mb=peak_kb / 1024,
        started_monotonic=started_monotonic,
        error=error,
        **detail,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.contenders '<ContenderSpec JSON>'", file=sys.stderr)
        return 2
    spec = ContenderSpec.model_validate_json(argv[0])
    report = measure(spec)
    sys.stdout.write(RESULT_PREFIX + json.dumps(report.model_dump(mode="json")) + "\n")
    sys.stdout.flush()
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
