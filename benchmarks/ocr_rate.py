"""OCR throughput and worker-pool overhead, measured the way the pipeline reads documents.

    uv run python -m benchmarks.ocr_rate --pages 8 --processes 1,2

For each pool size, N one-page scans (invoiceflow.scans) are read concurrently through
`DocumentWorkers.aread` while a ticker on the same event loop records how late its
20 ms sleeps wake up (the loop that drives the LLM calls). Also: Tesseract CPU per
page (in-process, serial) and the pool's round-trip overhead per job. On a shared
machine, quote ratios between the rows rather than absolute figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Annotated, Any

import typer

from invoiceflow.documents import DocumentLimits, read_document
from invoiceflow.pdf import parse_pdf
from invoiceflow.samples import corpus_seed, generate_invoice
from invoiceflow.sandbox import DocumentWorkers
from invoiceflow.scans import scanned_pdf

app = typer.Typer(add_completion=False)


def scanned_invoices(n: int, seed: int = 0) -> list[bytes]:
    """``n`` scans of one-page generated invoices (multi-page ones are skipped)."""
    scans: list[bytes] = []
    index = 0
    while len(scans) < n:
        pdf, _ = generate_invoice(corpus_seed(seed, index))
        index += 1
        if parse_pdf(pdf).pages == 1:
            scans.append(scanned_pdf(pdf, index))
    return scans


def _scan_one(item: tuple[str, bytes], seed: int) -> tuple[str, bytes]:
    stem, pdf = item
    return stem, scanned_pdf(pdf, seed)


def scan_some(
    pdfs: list[tuple[str, bytes]], share: float, *, seed: int = 0
) -> list[tuple[str, bytes]]:
    """``pdfs`` with a ``share`` of them (picked by ``seed``) replaced by their scans."""
    chosen = sorted(random.Random(seed).sample(range(len(pdfs)), round(len(pdfs) * share)))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        scans = pool.map(_scan_one, [pdfs[i] for i in chosen], chosen, chunksize=8)
        replaced = dict(zip(chosen, scans, strict=True))
    return [replaced.get(i, item) for i, item in enumerate(pdfs)]


async def _read_all(workers: DocumentWorkers, scans: list[bytes]) -> dict[str, float]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            due = time.monotonic() + 0.02
            await asyncio.sleep(0.02)
            lags.append(max(0.0, time.monotonic() - due))

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    await asyncio.gather(*(workers.aread(scan, f"scan-{i}.pdf") for i, scan in enumerate(scans)))
    wall = time.monotonic() - started
    stop.set()
    await ticking
    return {
        "pages": len(scans),
        "wall_s": round(wall, 2),
        "pages_per_s": round(len(scans) / wall, 3),
        "loop_lag_p99_ms": round(statistics.quantiles(lags, n=100)[98] * 1000, 1),
        "loop_lag_max_ms": round(max(lags) * 1000, 1),
    }


def ocr_rate(
    scans: list[bytes], processes: int, limits: DocumentLimits, *, nice: int = 10
) -> dict[str, float]:
    """Pages/s reading ``scans`` with a pool of ``processes`` (workers started first)."""
    with DocumentWorkers(processes, limits, nice=nice) as workers:
        asyncio.run(_warm(workers, processes))
        rate = asyncio.run(_read_all(workers, scans))
        return {"processes": processes, "nice": nice, **rate}


async def _warm(workers: DocumentWorkers, processes: int) -> None:
    await asyncio.gather(*(workers.acall(time.sleep, 0.2) for _ in range(processes)))


def cpu_per_page(scans: list[bytes], limits: DocumentLimits) -> float:
    """Tesseract + rendering CPU seconds per page, in this process, one page at a time.

    With one OpenMP thread per Tesseract, as in the workers: Tesseract's default
    OpenMP threads spin, which cost about 3x the CPU for a slower page here.
    """
    os.environ["OMP_THREAD_LIMIT"] = "1"
    before_self = resource.getrusage(resource.RUSAGE_SELF)
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    for scan in scans:
        read_document(scan, "scan.pdf", limits)
    after_self = resource.getrusage(resource.RUSAGE_SELF)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = sum(
        getattr(after, f) - getattr(before, f)
        for after, before in ((after_self, before_self), (after_children, before_children))
        for f in ("ru_utime", "ru_stime")
    )
    return round(used / len(scans), 2)


def pool_overhead_ms(jobs: int = 300) -> dict[str, float]:
    """Round trip of a no-op job, and of reading a small text PDF, via the pool vs in-process."""
    pdf, _ = generate_invoice(1)
    limits = DocumentLimits()
    started = time.perf_counter()
    for _ in range(50):
        read_document(pdf, "text.pdf", limits)
    inline = (time.perf_counter() - started) / 50
    with DocumentWorkers(1, limits) as workers:
        workers.call(abs, 0)
        workers.read(pdf, "text.pdf")
        started = time.perf_counter()
        for i in range(jobs):
            workers.call(abs, i)  # a builtin: nothing to import
        noop = (time.perf_counter() - started) / jobs
        started = time.perf_counter()
        for _ in range(50):
            workers.read(pdf, "text.pdf")
        pooled = (time.perf_counter() - started) / 50
    return {
        "noop_job_ms": round(noop * 1000, 2),
        "text_pdf_read_inline_ms": round(inline * 1000, 1),
        "text_pdf_read_pooled_ms": round(pooled * 1000, 1),
    }


def measure(pages: int, processes: list[int], nice: int = 10) -> dict[str, Any]:
    limits = DocumentLimits()
    scans = scanned_invoices(pages)
    result: dict[str, Any] = {"pool": pool_overhead_ms()}
    print(json.dumps(result))
    result["cpu_s_per_page"] = cpu_per_page(scans[: max(2, pages // 4)], limits)
    print(json.dumps(result))
    result["rates"] = []
    for size in processes:
        result["rates"].append(ocr_rate(scans, size, limits, nice=nice))
        print(json.dumps(result["rates"][-1]))
    return result


@app.command()
def main(
    pages: Annotated[int, typer.Option(help="Scanned pages per pool size.")] = 8,
    processes: Annotated[str, typer.Option(help="Pool sizes to compare.")] = "1,2",
    nice: Annotated[int, typer.Option(help="Workers' niceness increment.")] = 10,
) -> None:
    """Measure OCR pages/s per pool size, the flow loop's lag meanwhile, and pool overhead."""
    result = measure(pages, [int(p) for p in processes.split(",")], nice)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
