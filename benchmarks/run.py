"""`make bench`: the pipeline against the seed's asyncio design and naive Prefect.

    uv run python -m benchmarks.run --n 1000 --latency 2 --concurrency 32
    uv run python -m benchmarks.run --scale-manifest 100000

Starts a private stack (Prefect server + moto S3 on free ports, in a temp dir) and the
loopback LLM server out of process, uploads N generated invoices under one prefix per
contender, runs each contender in a fresh process, reads every manifest back from S3,
prints a table and writes `bench-results.json`. Everything it started is stopped at
the end, also on errors and Ctrl-C. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from benchmarks.contenders import (
    API_KEY_ENV,
    RESULT_PREFIX,
    ContenderName,
    ContenderReport,
    ContenderSpec,
)
from benchmarks.measure import (
    CpuWindow,
    cpu_rate,
    find_child,
    generate_pdfs,
    load_average,
    upload_pdfs,
    wait_until_quiet,
)
from devtools.llm_server import LLMServerHandle, spawn_llm_server, utilisation
from invoiceflow import stack
from invoiceflow.manifest import ManifestStore, Status
from invoiceflow.storage import S3Store, make_s3_client

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "bench-results.json"
BUCKET = "invoiceflow-bench"
CONTENDER_ORDER: tuple[ContenderName, ...] = ("seed", "pipeline", "naive")
STDERR_TAIL_CHARS = 3000

console = Console(width=None if sys.stdout.isatty() else 150)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def ideal_s(n: int, concurrency: int, latency_s: float) -> float:
    """The LLM-bound floor: ceil(N/C) waves of one LLM latency each."""
    return math.ceil(n / concurrency) * latency_s


def progress(message: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")


@dataclass
class Bench:
    """What every contender run shares: the stack, the LLM server, the corpus."""

    info: stack.StackInfo
    s3: S3Store
    llm: LLMServerHandle
    llm_pid: int | None
    run_id: str
    workdir: Path
    concurrency: int
    latency_s: float
    extractor_block: str
    child_env: dict[str, str]
    server_idle_cores: float = 0.0
    profile_dir: Path | None = None
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def prefix(self, name: str) -> str:
        return f"bench/{self.run_id}/{name}/"

    def lock_name(self, name: str) -> str:
        return f"bench-{name}-{self.run_id}"


# ---------------------------------------------------------------- setup


async def _provision(info: stack.StackInfo, lock_names: list[str], block: str, api_key: str,
                     llm_base_url: str, concurrency: int) -> None:  # fmt: skip
    from pydantic import SecretStr

    from blocks.extractor import ExtractorBlock
    from flows.lock import ensure_manifest_lock
    from flows.provision import provision_local

    await provision_local(bucket=info.bucket, endpoint_url=info.s3_endpoint, samples=0)
    for name in lock_names:
        await ensure_manifest_lock(name)
    await ExtractorBlock(
        kind="openai",
        base_url=llm_base_url,
        model="bench-model",
        api_key=SecretStr(api_key),
        # The provider-wide limit (a Prefect concurrency limit shared by every run of
        # this block) is what production uses; the bench measures its slot utilisation.
        max_in_flight=concurrency,
        # The HTTP pool must not be the cap at C > 64 (bench-saturation runs C=256).
        max_connections=max(64, concurrency),
        # Scans (--scan-share) are read by OCR in the document workers, the scenario
        # measured; with vision they would go to the loopback model as images instead.
        vision="never",
    ).save(block, overwrite=True)


# ---------------------------------------------------------------- one contender


def _profiler_argv(
    out: Path, *, pid: int | None = None, argv: list[str] | None = None
) -> list[str]:
    """py-spy on the contender (`argv`) or on the running server (`pid`).

    The contender is sampled only while holding the GIL (--gil), which makes samples
    track its Python CPU rather than threads blocked in I/O. The server is sampled
    without --gil, because SQLite does its work with the GIL released.
    """
    base = [stack._bin("py-spy"), "record", "--format", "raw", "--rate", "50",
            "--nonblocking", "--subprocesses", "--output", str(out)]  # fmt: skip
    if argv is not None:
        return [*base, "--gil", "--", *argv]
    return [*base, "--pid", str(pid)]


def run_contender(bench: Bench, name: ContenderName, n: int, timeout_s: float) -> dict[str, Any]:
    prefix = bench.prefix(name)
    spec = ContenderSpec(
        contender=name,
        n=n,
        concurrency=bench.concurrency,
        source_prefix=prefix,
        results_prefix=f"bench-results/{bench.run_id}/{name}/",
        manifest_key=f"bench/{bench.run_id}/{name}-manifest.json",
        bucket=bench.info.bucket,
        s3_endpoint=bench.info.s3_endpoint,
        llm_base_url=bench.llm.base_url,
        extractor_block=bench.extractor_block,
        manifest_lock=bench.lock_name(name),
        flow_overrides={"commit_interval_s": 0, "max_commit_batch": 1} if name == "naive" else {},
    )
    argv = [sys.executable, "-m", "benchmarks.contenders", spec.model_dump_json()]
    out_path = bench.workdir / f"{name}.stdout"
    err_path = bench.workdir / f"{name}.stderr"
    server_profiler: subprocess.Popen[bytes] | None = None
    if bench.profile_dir is not None and name == "pipeline":
        argv = _profiler_argv(bench.profile_dir / f"{name}-client.txt", argv=argv)
        server_profiler = subprocess.Popen(
            _profiler_argv(bench.profile_dir / f"{name}-server.txt", pid=bench.info.prefect_pid),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        bench.running.append(server_profiler)

    bench.llm.reset()
    load_before = load_average()
    windows = {
        "prefect_server": CpuWindow(bench.info.prefect_pid).start(),
        "s3_server": CpuWindow(bench.info.s3_pid).start(),
        **({"llm_server": CpuWindow(bench.llm_pid).start()} if bench.llm_pid else {}),
    }
    started = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=bench.child_env,
            cwd=REPO_ROOT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in `finally`
        )
        bench.running.append(proc)
        timed_out = False
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Also on Ctrl-C/SIGTERM: the contender has its own session, so nothing
            # else would stop it.
            _stop_process(proc)
            bench.running.remove(proc)
    process_wall_s = time.monotonic() - started

    # Work the server does after the client is gone (recording task runs, events)
    # belongs to this contender, so wait for the server to go quiet first.
    settle_s = (
        wait_until_quiet(bench.info.prefect_pid, threshold_cores=bench.server_idle_cores + 0.05)
        if name != "seed"
        else 0.0
    )
    for window in windows.values():
        window.stop()
    if server_profiler is not None:
        server_profiler.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server_profiler.wait(30)
        bench.running.remove(server_profiler)

    report, stderr_tail = _read_report(out_path, err_path)
    detail: dict[str, Any] = {
        "status": "ok",
        "n": n,
        "ideal_s": ideal_s(n, bench.concurrency, bench.latency_s),
        "process_wall_s": round(process_wall_s, 3),
        "settle_s": round(settle_s, 1),
        "load_avg_1m_before": round(load_before, 2),
        "prefix": prefix,
        "manifest_key": spec.manifest_key,
    }
    if report is None or not report.ok or timed_out:
        detail["status"] = "failed"
        detail["error"] = (
            f"timed out after {timeout_s:.0f} s"
            if timed_out
            else (report.error if report is not None else f"exit code {proc.returncode}")
        )
        detail["stderr_tail"] = stderr_tail
    _add_manifest_figures(bench, detail, spec)
    server_cpu_s = windows["prefect_server"].cpu_s if name != "seed" else 0.0
    if report is not None:
        client_cpu_s = report.cpu_s
        detail |= {
            "wall_s": round(report.wall_s, 3),
            "wall_over_ideal": round(report.wall_s / detail["ideal_s"], 3),
            "client_cpu_s": round(client_cpu_s, 3),
            "client_cpu_user_s": round(report.cpu_user_s, 3),
            "client_cpu_system_s": round(report.cpu_system_s, 3),
            "client_process_cpu_s": round(report.process_cpu_s, 3),
            "import_wall_s": round(report.import_wall_s, 3),
            "import_cpu_s": round(report.import_cpu_s, 3),
            "server_cpu_s": round(server_cpu_s, 3),
            "cpu_ms_per_invoice": round((client_cpu_s + server_cpu_s) / n * 1000, 2),
            "client_cpu_ms_per_invoice": round(client_cpu_s / n * 1000, 2),
            "server_cpu_ms_per_invoice": round(server_cpu_s / n * 1000, 2),
            "peak_rss_mb": round(report.peak_rss_mb, 1),
            "flow_summary": report.summary,
        }
    detail["prefect_server_cpu_s_in_window"] = round(windows["prefect_server"].cpu_s, 3)
    detail["s3_server_cpu_s"] = round(windows["s3_server"].cpu_s, 3)
    if "llm_server" in windows:
        detail["llm_server_cpu_s"] = round(windows["llm_server"].cpu_s, 3)
    _add_slot_figures(detail, name, report)
    # Seed and naive take the lock once per manifest update, so wall / acquisitions is
    # what one update costs them; the pipeline batches, so the figure means nothing there.
    if report is not None and name != "pipeline" and detail.get("slot_acquisitions"):
        detail["per_update_s"] = round(report.wall_s / detail["slot_acquisitions"], 3)
    stats = bench.llm.stats()
    _add_rate_figures(detail, n, report, stats)
    detail["llm_requests"] = stats["total"]
    detail["llm_max_in_flight"] = stats["max_in_flight"]
    # Busy request-seconds at the provider / (C slots x first request to last answer).
    detail["llm_slot_utilisation"] = round(utilisation(stats, slots=bench.concurrency), 3)
    return detail


def _add_rate_figures(
    detail: dict[str, Any], n: int, report: ContenderReport | None, stats: dict[str, Any]
) -> None:
    """Throughput, CPU of the S3 and LLM servers per invoice, and when the first LLM
    call reached the server, counted from the contender's start (after its imports;
    for the flow that includes creating the flow run) and, for a flow, from the flow
    run entering Running, just before Prefect calls the flow function."""
    for server in ("s3_server", "llm_server"):
        if f"{server}_cpu_s" in detail:
            detail[f"{server}_cpu_ms_per_invoice"] = round(detail[f"{server}_cpu_s"] / n * 1000, 2)
    if report is None or not report.wall_s:
        return
    detail["throughput_per_s"] = round(n / report.wall_s, 2)
    first = stats.get("first_start")
    if first is not None and report.started_monotonic:
        detail["first_llm_call_s"] = round(first - report.started_monotonic, 3)
    if first is not None and report.flow_started_monotonic:
        detail["first_llm_call_after_flow_start_s"] = round(
            first - report.flow_started_monotonic, 3
        )


def _read_report(out_path: Path, err_path: Path) -> tuple[ContenderReport | None, str]:
    stderr_tail = err_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
    for line in reversed(out_path.read_text(errors="replace").splitlines()):
        if line.startswith(RESULT_PREFIX):
            return ContenderReport.model_validate_json(line.removeprefix(RESULT_PREFIX)), (
                stderr_tail
            )
    return None, stderr_tail


def _add_manifest_figures(bench: Bench, detail: dict[str, Any], spec: ContenderSpec) -> None:
    """Writes, done and lost updates, read back from S3 (never from the contender)."""

    def read_only() -> contextlib.AbstractAsyncContextManager[Any]:
        raise RuntimeError("the benchmark only reads manifests")

    listed = sum(1 for _ in bench.s3.list_sources(spec.source_prefix))
    snapshot = ManifestStore(bench.s3, spec.manifest_key, lock=read_only).read_sync()
    counts = snapshot.counts()
    in_prefix = [k for k in snapshot.entries if k.startswith(spec.source_prefix)]
    detail |= {
        "listed": listed,
        "manifest_entries": len(in_prefix),
        "manifest_done": counts[Status.done.value],
        "manifest_failed": counts[Status.failed.value],
        "manifest_unfinished": counts[Status.pending.value] + counts[Status.processing.value],
        # The manifest's revision counts its writes (each commit writes revision + 1).
        "manifest_writes": snapshot.revision,
        "lost_updates": listed - counts[Status.done.value],
    }


def _add_slot_figures(
    detail: dict[str, Any], name: ContenderName, report: ContenderReport | None
) -> None:
    store_count = report.store_lock_acquisitions if report is not None else None
    # Counted where they happen (the store). Prefect's concurrency events used to be a
    # cross-check; slots are now taken through the lease API (flows/leases.py), which
    # emits none, so the key stays for the file's shape and is null.
    detail["slot_acquisitions_events"] = None
    if store_count is not None:
        source = "asyncio.Lock (ManifestStore)" if name == "seed" else "ManifestStore counter"
        detail["slot_acquisitions"], detail["slot_acquisitions_source"] = store_count, source
    else:
        # No counter: every write took the slot once, so writes is a floor.
        detail["slot_acquisitions"] = detail.get("manifest_writes")
        detail["slot_acquisitions_source"] = "manifest revision (lower bound)"
    if report is not None and report.store_writes is not None:
        detail["store_writes"] = report.store_writes
        detail["store_conflicts"] = report.store_conflicts


def _stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    """SIGTERM the contender's process group (it has its own), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- output


def results_document(
    n: int, latency_s: float, concurrency: int, naive_n: int, contenders: dict[str, Any]
) -> dict[str, Any]:
    pipeline = contenders.get("pipeline", {})
    seed = contenders.get("seed", {})
    naive = contenders.get("naive", {})
    if pipeline.get("wall_s") and seed.get("wall_s"):
        pipeline["pipeline_over_seed"] = round(pipeline["wall_s"] / seed["wall_s"], 3)
    return {
        "n": n,
        "latency_s": latency_s,
        "concurrency": concurrency,
        "ideal_s": ideal_s(n, concurrency, latency_s),
        "pipeline_wall_s": pipeline.get("wall_s"),
        "seed_wall_s": seed.get("wall_s"),
        "naive_wall_s": naive.get("wall_s"),
        "naive_n": naive_n,
        "manifest_writes": pipeline.get("manifest_writes"),
        "slot_acquisitions": pipeline.get("slot_acquisitions"),
        "lost_updates": pipeline.get("lost_updates"),
        "cpu_ms_per_invoice": pipeline.get("cpu_ms_per_invoice"),
        "peak_rss_mb": pipeline.get("peak_rss_mb"),
        "llm_slot_utilisation": pipeline.get("llm_slot_utilisation"),
        "contenders": contenders,
    }


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def print_table(doc: dict[str, Any]) -> None:
    table = Table(
        title=f"invoiceflow bench: N={doc['n']} L={doc['latency_s']}s C={doc['concurrency']}",
        caption="CPU = contender process + Prefect server, per invoice; S3 and LLM servers "
        "excluded",
    )
    for column in ("contender", "status", "N", "wall s", "ideal s", "wall/ideal", "writes",
                   "slots", "s/update", "lost", "CPU ms/inv", "client", "server", "RSS MB",
                   "LLM max in flight", "LLM slots busy"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("contender", "status") else "right")
    for name, d in doc["contenders"].items():
        status = "[green]ok[/]" if d["status"] == "ok" else f"[red]{d['status']}[/]"
        lost = d.get("lost_updates")
        table.add_row(
            name,
            status,
            _fmt(d.get("n")),
            _fmt(d.get("wall_s"), ".1f"),
            _fmt(d.get("ideal_s"), ".0f"),
            _fmt(d.get("wall_over_ideal"), ".2f"),
            _fmt(d.get("manifest_writes")),
            _fmt(d.get("slot_acquisitions")),
            _fmt(d.get("per_update_s"), ".3f"),
            f"[red]{lost}[/]" if lost else _fmt(lost),
            _fmt(d.get("cpu_ms_per_invoice"), ".1f"),
            _fmt(d.get("client_cpu_ms_per_invoice"), ".1f"),
            _fmt(d.get("server_cpu_ms_per_invoice"), ".1f"),
            _fmt(d.get("peak_rss_mb"), ".0f"),
            _fmt(d.get("llm_max_in_flight")),
            _fmt(d.get("llm_slot_utilisation"), ".0%"),
        )
    console.print(table)
    pipeline = doc["contenders"].get("pipeline", {})
    if "pipeline_over_seed" in pipeline:
        console.print(f"pipeline/seed wall: {pipeline['pipeline_over_seed']:.2f}")
    for name, d in doc["contenders"].items():
        if d["status"] != "ok":
            console.print(f"[red]{name} failed:[/] {d.get('error')}")
            console.print(d.get("stderr_tail", ""), markup=False, highlight=False)


def write_json(doc: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind the harness, so every `finally` stops what it started.

    SIGINT gets Python's default handler back even when the shell that started us
    ignored it (background jobs of non-interactive shells inherit SIGINT ignored).
    """

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous_term = signal.signal(signal.SIGTERM, exit_on_sigterm)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def run_bench(
    *,
    n: int,
    latency_s: float,
    concurrency: int,
    naive_n: int,
    contenders: list[ContenderName],
    output: Path,
    corpus_seed: int,
    timeout_s: float | None,
    profile_dir: Path | None,
    keep_workdir: bool,
    scan_share: float = 0.0,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="invoiceflow-bench-"))
    run_id = uuid.uuid4().hex[:8]
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as cleanup:
        if not keep_workdir:
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            cleanup.callback(progress, f"kept {workdir} (logs, contender stdout/stderr)")
        sizes = {c: (naive_n if c == "naive" else n) for c in contenders}
        # Rendering PDFs is CPU-bound and independent of the servers: overlap it with
        # their start-up (the Prefect server's first start runs its migrations).
        generating = cleanup.enter_context(ThreadPoolExecutor(max_workers=1)).submit(
            _generate, max(sizes.values()), corpus_seed, scan_share
        )
        api_key = "sk-bench-" + secrets.token_hex(16)
        progress(f"starting the LLM server out of process (latency {latency_s}s ± 10%)")
        llm = cleanup.enter_context(
            spawn_llm_server(latency_s=latency_s, jitter_s=latency_s * 0.1, api_key=api_key)
        )
        progress(f"starting Prefect + moto S3 on free ports (state in {workdir})")
        cleanup.callback(stack.down, workdir)
        info, _ = stack.up(
            workdir,
            prefect_port=stack.free_port(),
            s3_port=stack.free_port(),
            bucket=BUCKET,
            die_with_caller=True,
        )
        # Before anything imports Prefect: this process and the contenders use our stack.
        base_env = dict(os.environ)
        os.environ.update(info.env())
        bench = Bench(
            info=info,
            s3=S3Store(
                make_s3_client(
                    endpoint_url=info.s3_endpoint,
                    aws_access_key_id="invoiceflow-local",
                    aws_secret_access_key="invoiceflow-local",
                ),
                info.bucket,
            ),
            llm=llm,
            llm_pid=find_child("devtools.llm_server"),
            run_id=run_id,
            workdir=workdir,
            concurrency=concurrency,
            latency_s=latency_s,
            extractor_block=f"bench-llm-{run_id}",
            child_env={**base_env, **info.env(), API_KEY_ENV: api_key},
            profile_dir=profile_dir,
        )
        cleanup.callback(_stop_all, bench)
        progress("provisioning bucket, manifest locks and the LLM extractor block")
        asyncio.run(
            _provision(
                info,
                [bench.lock_name(c) for c in contenders],
                bench.extractor_block,
                api_key,
                llm.base_url,
                bench.concurrency,
            )
        )
        pdfs = generating.result()
        for name in contenders:
            started = time.monotonic()
            upload_pdfs(bench.s3, bench.prefix(name), pdfs[: sizes[name]])
            progress(f"uploaded {sizes[name]} invoices under {bench.prefix(name)} "
                     f"in {time.monotonic() - started:.1f}s")  # fmt: skip
        del pdfs
        bench.server_idle_cores = cpu_rate(info.prefect_pid, 2.0)
        progress(f"Prefect server idle CPU: {bench.server_idle_cores * 100:.1f}% of a core")
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
        for name in contenders:
            size = sizes[name]
            ideal = ideal_s(size, concurrency, latency_s)
            limit = timeout_s or _default_timeout(name, size, ideal)
            progress(f"[bold]{name}[/]: {size} invoices (ideal {ideal:.0f}s, timeout {limit:.0f}s)")
            try:
                results[name] = run_contender(bench, name, size, limit)
            except Exception as exc:  # the harness itself failed for this one; go on
                results[name] = {"status": "failed", "n": size, "error": repr(exc)}
            d = results[name]
            progress(
                f"{name}: {d['status']}, wall {_fmt(d.get('wall_s'), '.1f')}s, "
                f"writes {_fmt(d.get('manifest_writes'))}, lost {_fmt(d.get('lost_updates'))}, "
                f"{_fmt(d.get('cpu_ms_per_invoice'), '.1f')} CPU ms/invoice"
            )
        ordered = {c: results[c] for c in ("seed", "naive", "pipeline") if c in results}
        doc = results_document(n, latency_s, concurrency, naive_n, ordered)
        if scan_share:
            doc["scans"] = _scan_figures(n, scan_share, corpus_seed, doc)
        write_json(doc, output)
        progress(f"wrote {output}")
    return doc


def _generate(n: int, seed: int, scan_share: float = 0.0) -> list[tuple[str, bytes]]:
    started = time.monotonic()
    pdfs = generate_pdfs(n, seed=seed)
    progress(f"generated {len(pdfs)} invoices in {time.monotonic() - started:.1f}s")
    if scan_share:
        started = time.monotonic()
        from benchmarks.ocr_rate import scan_some

        pdfs = scan_some(pdfs, scan_share, seed=seed)
        progress(f"scanned {_scanned(n, scan_share)} of them in {time.monotonic() - started:.1f}s")
    return pdfs


def _scanned(n: int, scan_share: float) -> int:
    return round(n * scan_share)


def _scan_figures(n: int, scan_share: float, seed: int, doc: dict[str, Any]) -> dict[str, Any]:
    """The scan scenario's figures: how many scans, and OCR pages/s per pool size."""
    from benchmarks.ocr_rate import ocr_rate, scanned_invoices
    from invoiceflow.documents import DocumentLimits

    progress("measuring OCR pages/s with 1 and 2 document worker processes")
    sample = scanned_invoices(6, seed)
    rates = [ocr_rate(sample, processes, DocumentLimits()) for processes in (1, 2)]
    return {
        "share": scan_share,
        "scanned_invoices": _scanned(n, scan_share),
        "pipeline_wall_s": doc.get("pipeline_wall_s"),
        "ocr": rates,
    }


def _default_timeout(name: ContenderName, n: int, ideal: float) -> float:
    if name == "naive":
        # Three updates per invoice, each waiting out the server's Retry-After (~0.6 s).
        return 180 + 3 * n * 2.0
    return 300 + 5 * ideal + 0.2 * n


def _stop_all(bench: Bench) -> None:
    for proc in list(bench.running):
        if proc.args and "py-spy" in str(proc.args[0]):
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        _stop_process(proc)


@app.command()
def main(
    n: Annotated[int, typer.Option("--n", min=1, help="Invoices per contender.")] = 1000,
    latency: Annotated[float, typer.Option(min=0, help="LLM latency L in seconds.")] = 2.0,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="LLM concurrency C.")] = 32,
    naive_n: Annotated[
        int | None, typer.Option(min=1, help="Invoices for naive Prefect (default min(N, 100)).")
    ] = None,
    contenders: Annotated[
        str, typer.Option(help="Comma-separated subset of seed,pipeline,naive (run order).")
    ] = ",".join(CONTENDER_ORDER),
    output: Annotated[Path, typer.Option(help="Where to write the results JSON.")] = (
        DEFAULT_OUTPUT
    ),
    seed: Annotated[int, typer.Option(help="Corpus seed.")] = 0,
    timeout: Annotated[
        float | None, typer.Option(help="Per-contender timeout in seconds (default: scaled).")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy the pipeline contender and the Prefect server into DIR."),
    ] = None,
    keep_workdir: Annotated[bool, typer.Option(help="Keep the temp dir with all logs.")] = False,
    scale_manifest: Annotated[
        int, typer.Option(help="Instead: time one manifest commit at this many entries.")
    ] = 0,
    scan_share: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="Share of invoices uploaded as image-only scans (OCR). Compare the "
            "pipeline's wall time with a run without; OCR pages/s are measured too.",
        ),
    ] = 0.0,
    stack_mode: Annotated[
        str,
        typer.Option(
            "--stack",
            help="embedded (the contenders) | production: embedded vs Prefect's production "
            "stack through deployments and workers (benchmarks/stacks.py).",
        ),
    ] = "embedded",
    workers: Annotated[
        str, typer.Option(help="--stack production: worker counts to measure.")
    ] = "1,2,3",
) -> None:
    """Benchmark the pipeline against the seed's asyncio design and naive Prefect."""
    if stack_mode == "production":
        _run_stack_comparison(n, latency, concurrency, workers, output)
        return
    if scale_manifest:
        from benchmarks.manifest_scale import run_scale

        run_scale(entries=scale_manifest)
        return
    chosen: list[ContenderName] = []
    for raw in contenders.split(","):
        name = raw.strip()
        if name not in CONTENDER_ORDER:
            raise typer.BadParameter(f"unknown contender {name!r}", param_hint="--contenders")
        chosen.append(name)  # type: ignore[arg-type]
    try:
        with interruptible():
            doc = run_bench(
                n=n,
                latency_s=latency,
                concurrency=concurrency,
                naive_n=naive_n or min(n, 100),
                contenders=chosen,
                output=output,
                corpus_seed=seed,
                timeout_s=timeout,
                profile_dir=profile,
                keep_workdir=keep_workdir,
                scan_share=scan_share,
            )
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: everything the harness started has been stopped")
        raise typer.Exit(130) from None
    print_table(doc)
    if profile is not None:
        from benchmarks.profile_summary import summarize_dir

        summarize_dir(profile, console)
    if any(d["status"] != "ok" for d in doc["contenders"].values()):
        raise typer.Exit(1)


def _run_stack_comparison(
    n: int, latency: float, concurrency: int, workers: str, output: Path
) -> None:
    """`--stack production`: writes `bench-stacks.json` next to `--output`."""
    from benchmarks.stacks import print_rows, run_stacks, stacks_ok

    workdir = Path(tempfile.mkdtemp(prefix="invoiceflow-bench-stacks-"))
    try:
        with interruptible():
            rows = run_stacks(
                n=n, latency_s=latency, concurrency=concurrency,
                worker_counts=[int(w) for w in workers.split(",")],
                stacks=["embedded", "production"], workdir=workdir, run_id=uuid.uuid4().hex[:8],
            )  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc = {"n": n, "latency_s": latency, "concurrency": concurrency, "rows": rows}
    write_json(doc, output.with_name("bench-stacks.json"))
    print_rows(rows, console)
    if not stacks_ok(rows):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
