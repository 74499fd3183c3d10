"""The `invoiceflow` command: local stack, runs, manifest status, one-off extraction.

Prefect is imported inside the commands, after the stack's environment (PREFECT_API_URL,
PREFECT_HOME) is in place, so every command talks to the same server.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from invoiceflow import defaults, prodstack, stack

if TYPE_CHECKING:
    from flows.params import ProcessInvoicesParams
    from flows.provision import Provisioned
    from invoiceflow.reconcile import ReconcileReport

app = typer.Typer(
    help="invoiceflow: invoice PDFs in S3 → validated JSON, via Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Piped output (make, CI logs) would otherwise be squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)

StateDir = Annotated[
    Path | None,
    typer.Option(help="Where the local stack keeps its state (default ./.invoiceflow)."),
]


def _use_local_stack(state_dir: Path | None) -> stack.StackInfo | None:
    """Point this process at the local stack unless PREFECT_API_URL is already set.

    The embedded stack wins if it runs; else a running production stack
    (`invoiceflow up --production`), whose environment is applied the same way.
    """
    info = stack.load(state_dir)
    configured = os.environ.get("PREFECT_API_URL")
    if configured and (info is None or configured != info.api_url):
        return None  # the user configured another stack; respect it
    if info is None or not stack.is_running(info):
        production = prodstack.load(_production_dir(state_dir))
        if not configured and production is not None and prodstack.is_running(production):
            os.environ.update(production.env())
            return None
        err.print(
            "[red]The local stack is not running.[/] Start it with `invoiceflow up`, "
            "or set PREFECT_API_URL to use another Prefect server."
        )
        raise typer.Exit(2)
    os.environ.update(info.env())
    return info


def _production_dir(state_dir: Path | None) -> Path:
    return (state_dir / "production") if state_dir else prodstack.default_state_dir()


def _production_only_running(state_dir: Path | None) -> bool:
    production = prodstack.load(_production_dir(state_dir))
    embedded = stack.load(state_dir)
    return (
        production is not None
        and prodstack.is_running(production)
        and (embedded is None or not stack.is_running(embedded))
    )


def _report(done: Provisioned) -> None:
    for line in done.created:
        console.print(f"[green]created[/] {line}")
    for line in done.kept:
        console.print(f"[dim]ok[/]      {line}")


@app.command()
def up(
    state_dir: StateDir = None,
    prefect_port: Annotated[
        int | None, typer.Option(help="Prefect server port [default: 4200].")
    ] = None,
    s3_port: Annotated[
        int | None, typer.Option(help="Local S3 (moto) port [default: 5055].")
    ] = None,
    samples: Annotated[int, typer.Option(help="Sample invoices to upload.")] = 12,
    bucket: Annotated[str, typer.Option(help="Bucket to create.")] = "invoiceflow",
    local: Annotated[
        bool, typer.Option(help="Start the embedded stack even though PREFECT_API_URL is set.")
    ] = False,
    production: Annotated[
        bool,
        typer.Option(
            help="Prefect's production stack instead: Postgres, Redis, API replicas behind "
            "haproxy (TLS, basic auth), S3 and workers."
        ),
    ] = False,
    replicas: Annotated[int, typer.Option(help="--production: API replicas.")] = 2,
    workers: Annotated[int, typer.Option(help="--production: process workers.")] = 2,
    worker_limit: Annotated[
        int, typer.Option(help="--production: flow runs per worker at once.")
    ] = 1,
) -> None:
    """Start (or reuse) a local stack and provision it: bucket, blocks, lock, samples.

    With PREFECT_API_URL set, no second server is started: it says which server is in
    use (provision that one with `invoiceflow provision`), unless --local is given.
    """
    external = os.environ.get("PREFECT_API_URL")
    if external and not local and not production:
        console.print(
            f"PREFECT_API_URL is set: using the Prefect server at {external}; no local "
            "server started. Provision it with `invoiceflow provision --bucket NAME "
            "[--endpoint-url URL --region R]`, or run `invoiceflow up --local` to start "
            "the embedded stack for this command anyway."
        )
        return
    if production or (not local and _production_only_running(state_dir)):
        if not production:
            console.print(
                "The production stack is running: using it (--local starts the embedded one)."
            )
            workers = 0
        _up_production(state_dir, samples, bucket, replicas, workers, worker_limit)
        return
    _up_embedded(state_dir, prefect_port, s3_port, samples, bucket)


def _up_embedded(
    state_dir: Path | None, prefect_port: int | None, s3_port: int | None, samples: int, bucket: str
) -> None:
    try:
        with console.status("starting Prefect server and S3 on 127.0.0.1 …"):
            info, reused = stack.up(
                state_dir, prefect_port=prefect_port, s3_port=s3_port, bucket=bucket
            )
    except stack.StackError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    os.environ.update(info.env())
    from flows.provision import provision_local

    _, uploaded = asyncio.run(
        provision_local(bucket=info.bucket, endpoint_url=info.s3_endpoint, samples=samples)
    )
    verb = "reused" if reused else "started"
    console.print(
        f"[green]Local stack {verb}.[/] Prefect UI: {info.ui_url}  "
        f"S3: {info.s3_endpoint}  bucket: {info.bucket}  "
        f"new sample invoices: {uploaded}"
    )
    console.print("To use it from a shell:  eval $(invoiceflow env)")


def _up_production(
    state_dir: Path | None, samples: int, bucket: str, replicas: int, workers: int, limit: int
) -> None:
    try:
        with console.status("starting Postgres, Redis, API replicas, haproxy and S3 …"):
            info, reused = prodstack.up_production(
                _production_dir(state_dir), replicas=replicas, bucket=bucket
            )
    except stack.StackError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    os.environ.update(info.env())
    from flows.deploy import ensure_work_pool, worker_command
    from flows.provision import provision_local

    _, uploaded = asyncio.run(
        provision_local(bucket=info.bucket, endpoint_url=info.s3_endpoint, samples=samples)
    )
    asyncio.run(ensure_work_pool())
    running = [name for name in info.pids if name.startswith("worker-")]
    for index in range(len(running), workers):
        prodstack.start_worker(
            info, worker_command(limit=limit), f"worker-{index}", die_with_caller=False
        )
    verb = "reused" if reused else "started"
    console.print(
        f"[green]Production stack {verb}.[/] API (haproxy, TLS): {info.api_url} over "
        f"{len(info.replica_ports)} replicas; UI: {info.ui_url} (user {prodstack.API_USER}); "
        f"S3: {info.s3_endpoint}; workers: {max(workers, len(running))} (limit {limit}); "
        f"new sample invoices: {uploaded}. State and logs: {info.state_dir}"
    )
    console.print("To use it from a shell:  eval $(invoiceflow env --production)")


@app.command()
def provision(
    state_dir: StateDir = None,
    bucket: Annotated[
        str | None, typer.Option(help="Bucket the invoices live in [default: local stack's].")
    ] = None,
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint (MinIO, R2, moto); none for AWS.")
    ] = None,
    region: Annotated[str | None, typer.Option(help="Region of the bucket.")] = None,
    create_bucket: Annotated[bool, typer.Option(help="Create the bucket if missing.")] = False,
    store_keys: Annotated[
        bool,
        typer.Option(
            help="Store AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from this environment in the "
            "block. Default: no keys; runs use the default credential chain of their machine."
        ),
    ] = False,
    samples: Annotated[int, typer.Option(help="Generated sample invoices to upload.")] = 0,
    prefix: Annotated[str, typer.Option(help="Where the samples go.")] = defaults.SOURCE_PREFIX,
    lock: Annotated[str, typer.Option(help="The manifest's concurrency limit.")] = (
        defaults.MANIFEST_LOCK
    ),
) -> None:
    """Create or repair what runs need on PREFECT_API_URL's server (else the local stack):
    the S3 blocks, the extractor block, the manifest lock, optionally the bucket and
    samples. Idempotent: run it again after any change."""
    info = _use_local_stack(state_dir)
    from flows.provision import Provisioned, StorageTarget
    from flows.provision import provision as provision_stack

    if bucket is None and info is None:
        err.print("[red]--bucket is required for a server other than the local stack[/]")
        raise typer.Exit(2)
    keys = (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if store_keys and not all(keys):
        err.print("[red]--store-keys needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set[/]")
        raise typer.Exit(2)
    target = StorageTarget(
        bucket or info.bucket,  # type: ignore[union-attr]
        endpoint_url or (info.s3_endpoint if info and not bucket else None),
        region,
        *(keys if store_keys else (None, None)),
    )
    done = Provisioned()
    api = os.environ["PREFECT_API_URL"]
    try:
        asyncio.run(
            provision_stack(
                target, create_bucket=create_bucket, samples=samples, prefix=prefix,
                lock=lock, done=done,
            )
        )  # fmt: skip
    except Exception as exc:
        _report(done)
        err.print(f"[red]provisioning {api} stopped:[/] {exc}")
        raise typer.Exit(1) from None
    _report(done)
    console.print(f"Provisioned {api} for s3://{target.bucket}.")


@app.command()
def down(state_dir: StateDir = None) -> None:
    """Stop the local stacks' servers (embedded and production; data is kept)."""
    info = stack.down(state_dir)
    production = prodstack.down_production(_production_dir(state_dir))
    stopped = [name for name, s in (("Local", info), ("Production", production)) if s]
    console.print(
        " and ".join(stopped) + " stack stopped." if stopped else "No local stack was running."
    )


@app.command()
def env(
    state_dir: StateDir = None,
    production: Annotated[bool, typer.Option(help="The production stack's.")] = False,
) -> None:
    """Print `export` lines pointing a shell at the local (or production) stack."""
    found = prodstack.load(_production_dir(state_dir)) if production else stack.load(state_dir)
    if found is None:
        err.print(
            f"No {'production' if production else 'local'} stack; run `invoiceflow up` first."
        )
        raise typer.Exit(2)
    for key, value in found.env().items():
        print(f"export {key}={shlex.quote(value)}")


@app.command()
def run(
    state_dir: StateDir = None,
    prefix: Annotated[
        str, typer.Option(help="S3 prefix holding the PDFs.")
    ] = defaults.SOURCE_PREFIX,
    selection: Annotated[Literal["new", "failed", "all"], typer.Option()] = "new",
    concurrency: Annotated[int, typer.Option(help="Max LLM calls in flight.")] = 8,
    extractor_block: Annotated[str, typer.Option()] = defaults.EXTRACTOR_BLOCK,
    verbose: Annotated[bool, typer.Option(help="Show Prefect's run logs.")] = False,
) -> None:
    """Run the process-invoices flow now, showing progress, then the manifest table."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    info = _use_local_stack(state_dir)
    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    params = ProcessInvoicesParams(
        source_prefix=prefix,
        selection=selection,
        max_llm_concurrency=concurrency,
        extractor_block=extractor_block,
    )
    store = _manifest_store(params.bucket_block, params.manifest_key)
    before = _finished_under(store, params.source_prefix)
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["summary"] = asyncio.run(process_invoices(params))
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="process-invoices")
    worker.start()
    total = sum(1 for _ in store.s3.list_sources(params.source_prefix))
    with Progress(
        TextColumn("[bold]invoices"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("invoices", total=total)
        while worker.is_alive():
            progress.update(bar, completed=_finished_under(store, params.source_prefix))
            worker.join(0.5)
        progress.update(bar, completed=_finished_under(store, params.source_prefix))
    _print_manifest(store, params.source_prefix)
    summary = outcome.get("summary")
    processed = getattr(summary, "processed", None)
    if processed == 0 or (processed is None and "error" not in outcome):
        console.print(f"Nothing new under {prefix} ({before} already finished).")
    elif summary is not None:
        console.print(f"Processed {processed} invoices.")
    if info is not None:
        console.print(f"Prefect UI: {info.ui_url}")
    if "error" in outcome:
        err.print(f"[red]Run failed:[/] {outcome['error']}")
        raise typer.Exit(1)


@app.command()
def deploy(
    state_dir: StateDir = None,
    bucket: Annotated[
        str | None,
        typer.Option(help="S3 bucket to (re)write the bucket block for (no keys stored)."),
    ] = None,
    region: Annotated[str | None, typer.Option(help="AWS region of --bucket.")] = None,
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint of --bucket (MinIO, R2).")
    ] = None,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            envvar="INVOICEFLOW_WEBHOOK_URL",
            help="Save a Custom Webhook block that failed runs notify.",
        ),
    ] = None,
    pull: Annotated[
        Literal["path", "git"],
        typer.Option(
            help="How flow runs get the code: `path` = this checkout's absolute path (same "
            "machine, or the same path everywhere); `git` = Prefect's git_clone of --repo."
        ),
    ] = "path",
    repo: Annotated[
        str | None, typer.Option(help="--pull git: repository URL (https, ssh or file://).")
    ] = None,
    branch: Annotated[str | None, typer.Option(help="--pull git: branch to clone.")] = None,
) -> None:
    """Create the work pool, manifest lock and blocks, then deploy prefect.yaml.

    Uses PREFECT_API_URL when set, otherwise the local stack of `invoiceflow up`.
    Everything that can refuse the deploy is checked before anything is created; if a
    later step fails, the output lists what was made.
    """
    info = _use_local_stack(state_dir)
    if pull == "git" and not repo:
        err.print("[red]--pull git needs --repo URL[/]")
        raise typer.Exit(2)
    _provision_and_deploy(
        bucket=bucket,
        region=region,
        endpoint_url=endpoint_url,
        webhook_url=webhook_url,
        git=repo if pull == "git" else None,
        branch=branch,
    )
    ui = info.ui_url if info is not None else os.environ["PREFECT_API_URL"].removesuffix("/api")
    console.print(
        f"Deployed. Start a worker with `make worker`; runs and the run form: {ui}/deployments"
    )


def _provision_and_deploy(
    *,
    bucket: str | None,
    region: str | None,
    endpoint_url: str | None,
    webhook_url: str | None,
    git: str | None,
    branch: str | None,
) -> None:
    """Prepare the server (pool, lock, blocks), then deploy prefect.yaml (git pull if `git`)."""
    from flows.deploy import (
        DeployError,
        deploy_all,
        prefect_file_with_git_pull,
        prepare_server,
    )
    from flows.provision import Provisioned, StorageTarget

    target = StorageTarget(bucket, endpoint_url, region) if bucket else None
    done = Provisioned()
    try:
        asyncio.run(prepare_server(target=target, webhook_url=webhook_url, done=done))
        _report(done)
        with tempfile.TemporaryDirectory(prefix="invoiceflow-deploy-") as scratch:
            deploy_all(prefect_file=git and prefect_file_with_git_pull(git, branch, Path(scratch)))
    except (DeployError, OSError, ValueError) as exc:
        _report_failure(done, exc)
        raise typer.Exit(1) from None


def _report_failure(done: Provisioned, exc: Exception) -> None:
    err.print(f"[red]deploy failed:[/] {exc}")
    if done.created:
        err.print("Made before the failure (kept; running deploy again reuses it):")
        for line in done.created:
            err.print(f"  {line}")
    else:
        err.print("Nothing was created.")


@app.command()
def worker(
    state_dir: StateDir = None,
    pool: Annotated[str, typer.Option(help="Work pool to take runs from.")] = "invoices",
    limit: Annotated[
        int | None, typer.Option(help="Most flow runs this worker runs at once.")
    ] = None,
) -> None:
    """Start a process worker: it runs each flow run of the pool as a subprocess.

    Start more (here or on other machines with the same checkout path and server) to
    run more flow runs at once.
    """
    _use_local_stack(state_dir)
    from flows.deploy import worker_command

    command = worker_command(work_pool=pool, limit=limit)
    sys.stdout.flush()
    # Replace this process: Ctrl-C and `kill` reach the worker itself, which then
    # shuts down its flow runs cleanly.
    os.execve(command[0], command, dict(os.environ))


@app.command()
def status(
    state_dir: StateDir = None,
    prefix: Annotated[str, typer.Option(help="Only invoices under this prefix.")] = "",
    bucket_block: Annotated[str, typer.Option()] = defaults.BUCKET_BLOCK,
    manifest_key: Annotated[str, typer.Option()] = defaults.MANIFEST_KEY,
) -> None:
    """Summarize the manifest: counts per status and one row per invoice."""
    _use_local_stack(state_dir)
    _print_manifest(_manifest_store(bucket_block, manifest_key), prefix)


@app.command()
def reconcile(
    state_dir: StateDir = None,
    prefix: Annotated[str, typer.Option(help="Source prefix whose entries to repair.")] = (
        defaults.SOURCE_PREFIX
    ),
    results_prefix: Annotated[
        str, typer.Option(help="Where the results are.")
    ] = defaults.RESULTS_PREFIX,
    bucket_block: Annotated[str, typer.Option()] = defaults.BUCKET_BLOCK,
    manifest_key: Annotated[str, typer.Option()] = defaults.MANIFEST_KEY,
    manifest_lock: Annotated[str, typer.Option(help="The manifest's concurrency limit.")] = (
        defaults.MANIFEST_LOCK
    ),
    release_claims_after: Annotated[
        float,
        typer.Option(
            help="Minutes after which an unfinished claim counts as abandoned and is "
            "released. Claims of runs Prefect reports ended are released at once, of "
            "runs it reports running never (0 releases every other claim)."
        ),
    ] = 15,
    prune: Annotated[bool, typer.Option(help="Remove entries whose source is gone.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Report what would change; write nothing.")] = (
        False
    ),
    rebuild: Annotated[
        bool,
        typer.Option(
            help="Replace a manifest that cannot be read (invalid JSON, wrong format, too "
            "large): copy it to <manifest-key>.broken-<timestamp> first, keep what still "
            "decodes, and rebuild this prefix's entries from the results."
        ),
    ] = False,
    max_manifest_bytes: Annotated[
        int, typer.Option(help="A larger manifest counts as unreadable (as in the flow).")
    ] = 256 * 1024 * 1024,
) -> None:
    """Repair the manifest from the result objects and the source listing.

    For after a crash, a lost manifest or a manual edit: an invoice whose result exists
    for its current source becomes done, a done one whose result is missing and claims
    nobody will finish become transient failures (the next run redoes them). Writes
    through the manifest lock with one conditional write, so running flows lose nothing.
    """
    from flows.params import ProcessInvoicesParams

    _use_local_stack(state_dir)
    folders = ProcessInvoicesParams(
        source_prefix=prefix, results_prefix=results_prefix, manifest_key=manifest_key
    )
    report = _run_reconcile(
        bucket_block,
        manifest_key,
        manifest_lock,
        folders,
        release_claims_after=release_claims_after,
        prune=prune,
        dry_run=dry_run,
        rebuild=rebuild,
        max_manifest_bytes=max_manifest_bytes,
    )
    _print_reconcile_report(report, folders, dry_run=dry_run)


def _run_reconcile(
    bucket_block: str,
    manifest_key: str,
    manifest_lock: str,
    folders: ProcessInvoicesParams,
    *,
    release_claims_after: float,
    prune: bool,
    dry_run: bool,
    rebuild: bool,
    max_manifest_bytes: int,
) -> ReconcileReport:
    """Run the repair; a failure (missing lock, unreadable manifest) exits with its reason."""
    import datetime as dt

    try:
        return asyncio.run(
            _reconcile(
                bucket_block,
                manifest_key,
                manifest_lock,
                source_prefix=folders.source_prefix,
                results_prefix=folders.results_prefix,
                release_claims_after=dt.timedelta(minutes=release_claims_after),
                prune=prune,
                dry_run=dry_run,
                rebuild=rebuild,
                max_manifest_bytes=max_manifest_bytes,
            )
        )
    except Exception as exc:  # a missing lock or an unreadable manifest: say what to do
        err.print(f"[red]reconcile failed:[/] {exc}")
        raise typer.Exit(1) from None


def _print_reconcile_report(
    report: ReconcileReport, folders: ProcessInvoicesParams, *, dry_run: bool
) -> None:
    table = Table(title=f"reconcile {folders.source_prefix} against {folders.results_prefix}")
    table.add_column("finding")
    table.add_column("invoices", justify="right")
    table.add_column("examples")
    for name, keys in report.as_dict().items():
        if isinstance(keys, list) and keys:
            table.add_row(name.replace("_", " "), str(len(keys)), ", ".join(keys[:3]))
    console.print(table)
    verb = "would change" if dry_run else "changed"
    console.print(f"{verb} {report.changes} entries; {report.unchanged} already consistent")
    if report.backup_key:
        console.print(f"the replaced manifest was copied to {report.backup_key}")


async def _reconcile(
    bucket_block: str, manifest_key: str, lock: str, max_manifest_bytes: int, **options: Any
) -> ReconcileReport:
    from prefect_aws import S3Bucket

    from flows.lock import check_manifest_lock, manifest_lock
    from flows.runs import flow_run_liveness
    from flows.s3 import s3_store
    from invoiceflow.manifest import ManifestStore
    from invoiceflow.reconcile import reconcile

    await check_manifest_lock(lock)
    bucket = await S3Bucket.load(bucket_block)
    s3 = s3_store(bucket)
    store = ManifestStore(s3, manifest_key, lock=manifest_lock(lock), max_bytes=max_manifest_bytes)
    return await reconcile(store, runs=flow_run_liveness, **options)


def _local_extractor(extractor: str, base_url: str | None, model: str):
    """An extractor for the offline commands; the API key only ever comes from the env."""
    if extractor == "rules":
        from invoiceflow.extractors.rules import RulesExtractor

        return RulesExtractor()
    from invoiceflow.extractors.openai import OpenAIExtractor

    return OpenAIExtractor(
        base_url=base_url or "https://api.openai.com/v1",
        api_key=os.environ.get("OPENAI_API_KEY", ""),
        model=model,
    )


@app.command()
def extract(
    pdf: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="A .pdf or .xml")
    ],
    extractor: Annotated[Literal["rules", "openai"], typer.Option()] = "rules",
    base_url: Annotated[str | None, typer.Option(envvar="OPENAI_BASE_URL")] = None,
    model: Annotated[str, typer.Option(envvar="OPENAI_MODEL")] = "gpt-4o-mini",
    einvoice: Annotated[
        bool, typer.Option(help="Read embedded Factur-X/ZUGFeRD/XRechnung XML when present.")
    ] = True,
    time_limit_s: Annotated[float, typer.Option(help="Wall clock for reading the file.")] = 120,
    memory_limit_mb: Annotated[int, typer.Option(help="Memory of the reading process.")] = 1024,
) -> None:
    """Print the fields extracted from one local PDF or e-invoice XML. Needs no Prefect
    server and no S3.

    The file is read in a worker process under the same time and memory limits as in
    the pipeline (scanned pages are OCR'd). A PDF with an embedded e-invoice (Factur-X,
    ZUGFeRD, XRechnung) or a bare XML e-invoice is read exactly from its XML, without
    calling any extractor. For --extractor openai the key is read from OPENAI_API_KEY,
    never from the command line.
    """
    from invoiceflow.documents import DocumentError, DocumentLimits
    from invoiceflow.evaluate import extract_file, local_workers
    from invoiceflow.extractors import ExtractionError

    limits = DocumentLimits(time_limit_s=time_limit_s, memory_limit_mb=memory_limit_mb)
    try:
        with local_workers(limits, processes=1) as workers:
            done = asyncio.run(
                extract_file(
                    pdf.read_bytes(),
                    _local_extractor(extractor, base_url, model),
                    name=pdf.name,
                    einvoice=einvoice,
                    workers=workers,
                )
            )
    except (DocumentError, ExtractionError) as exc:
        err.print(f"[red]{pdf}: {exc.kind}: {exc}[/]")
        raise typer.Exit(1) from None
    found = done.extraction
    detail = f" ({found.einvoice_format})" if found.einvoice_format else ""
    err.print(f"source: {found.source}{detail}  read as: {done.read_as}")
    for reason in done.validated.reasons:
        err.print(f"[yellow]needs review:[/] {reason}")
    sys.stdout.write(done.validated.invoice.model_dump_json(indent=2) + "\n")


@app.command("eval")
def eval_(
    directory: Annotated[Path, typer.Argument(file_okay=False, help="PDFs + expected <stem>.json")],
    extractor: Annotated[Literal["rules", "openai"], typer.Option()] = "rules",
    base_url: Annotated[str | None, typer.Option(envvar="OPENAI_BASE_URL")] = None,
    model: Annotated[str, typer.Option(envvar="OPENAI_MODEL")] = "gpt-4o-mini",
    einvoice: Annotated[bool, typer.Option(help="Use the e-invoice fast path.")] = True,
    generate: Annotated[
        int,
        typer.Option(
            help="First write this many generated invoices (EN/DE/FR/NL, varied layouts and "
            "number formats, some with embedded e-invoice XML) into DIRECTORY."
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the generated set.")] = 0,
    einvoice_share: Annotated[
        float, typer.Option(help="Share of generated invoices with embedded XML.")
    ] = 0.1,
    show: Annotated[int, typer.Option(help="Mismatches to show per field.")] = 3,
    scanned: Annotated[
        bool,
        typer.Option(
            help="Compare scans with text PDFs: --generate also writes a scanned copy of "
            "each invoice (and mixed text+scan PDFs); accuracy is reported per group."
        ),
    ] = False,
) -> None:
    """Score extraction on a folder of PDFs/XML with expected JSON: per-field exact match."""
    if generate:
        from invoiceflow.samples import write_corpus, write_scanned_corpus

        if scanned:
            write_scanned_corpus(directory, generate, seed)
        else:
            write_corpus(directory, generate, seed, varied=True, einvoice_share=einvoice_share)
    if not directory.is_dir():
        err.print(f"[red]{directory} is not a directory[/]")
        raise typer.Exit(2)
    chosen = _local_extractor(extractor, base_url, model)
    if scanned:
        _eval_scans(directory, chosen, extractor, show)
        return
    from invoiceflow.evaluate import evaluate_dir

    report = asyncio.run(evaluate_dir(directory, chosen, einvoice=einvoice))
    _print_eval(report, f"{extractor} on {directory}", show)


def _eval_scans(directory: Path, chosen: Any, extractor: str, show: int) -> None:
    from invoiceflow.evaluate import evaluate_scans, scan_summary

    reports = asyncio.run(evaluate_scans(directory, chosen))
    if "scan" not in reports:
        err.print(f"[red]no <stem>-scan.pdf with a same-stem .json in {directory}[/]")
        raise typer.Exit(2)
    for group, report in reports.items():
        _print_eval(report, f"{extractor} on {directory}: {group}", show)
    for line in scan_summary(reports):
        console.print(line)


def _print_eval(report: Any, title: str, show: int) -> None:
    from invoiceflow.evaluate import FIELDS

    if not report.documents:
        err.print(f"[red]no PDF or XML with a same-stem .json in {title}[/]")
        raise typer.Exit(2)
    table = Table(title=f"{title} ({report.documents} documents)")
    for col in ("field", "correct", "total", "accuracy"):
        table.add_column(col, justify="left" if col == "field" else "right")
    for name in FIELDS:
        score = report.fields[name]
        table.add_row(name, str(score.correct), str(score.total), f"{score.accuracy:.1%}")
    console.print(table)
    sources = ", ".join(f"{k} {v}" for k, v in sorted(report.sources.items()))
    read_as = ", ".join(f"{k} {v}" for k, v in sorted(report.read_as.items()))
    console.print(
        f"header fields: {report.header_accuracy:.1%}  line items: "
        f"{report.line_items_correct}/{report.line_items_total}  documents fully right: "
        f"{report.exact_documents}/{report.documents}  sources: {sources or '-'}  "
        f"read as: {read_as or '-'}  "
        f"needs review: {report.needs_review}  failed: {len(report.failures)}"
    )
    for stem, error in list(report.failures.items())[:show]:
        err.print(f"[red]{stem}[/]: {error}")
    for name, misses in report.mismatches.items():
        for stem, got, wanted in misses[:show] if name != "line_items" else []:
            console.print(f"  {name} {stem}: got {got!r}, expected {wanted!r}")


def _manifest_store(bucket_block: str, manifest_key: str):
    from prefect_aws import S3Bucket

    from flows.s3 import s3_store
    from invoiceflow.manifest import ManifestStore

    async def load() -> S3Bucket:
        return await S3Bucket.load(bucket_block)

    bucket = asyncio.run(load())
    s3 = s3_store(bucket)

    def read_only_lock():
        raise RuntimeError("the CLI only reads the manifest")

    return ManifestStore(s3, manifest_key, lock=read_only_lock)


def _finished_under(store, prefix: str) -> int:
    snap = store.read_sync()
    return sum(
        1
        for k, e in snap.entries.items()
        if k.startswith(prefix) and e["status"] in ("done", "failed")
    )


def _print_manifest(store, prefix: str) -> None:
    snap = store.read_sync()
    rows = sorted((k, e) for k, e in snap.entries.items() if k.startswith(prefix))
    table = Table(title=f"manifest s3://{store.s3.bucket}/{store.key}  (revision {snap.revision})")
    for col in ("invoice", "status", "vendor", "total", "currency", "attempts", "error"):
        table.add_column(col, justify="right" if col in ("total", "attempts") else "left")
    for key, e in rows:
        style = {"done": "green", "failed": "red"}.get(e["status"], "yellow")
        error = f"{e.get('error_kind')}: {e.get('error_message')}" if e.get("error_kind") else ""
        table.add_row(
            key,
            f"[{style}]{e['status']}[/]",
            e.get("vendor_name") or "",
            e.get("total") or "",
            e.get("currency") or "",
            str(e["attempts"]),
            error,
        )
    console.print(table)
    counts: dict[str, int] = {}
    for _, e in rows:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    console.print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "empty manifest")


if __name__ == "__main__":
    app()
