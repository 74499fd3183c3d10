"""`make bench-saturation`: the seed and the pipeline side by side where the run is
bound by CPU, not by LLM latency (issue 13 section 3).

    uv run python -m benchmarks.saturation --n 5000 --latency 2 --concurrency 256

At N=5,000, L=2 s and C=256 the LLM-bound ideal is 40 s, and on 2 cores the run is
CPU-bound. Same harness as `make bench` (`benchmarks.run.run_bench`: private stack,
LLM server out of process, each contender in a fresh process), contenders seed and
pipeline only. Writes ``bench-saturation.json``:

``contenders.seed`` / ``contenders.pipeline``
    ``wall_s``, ``throughput_per_s`` (invoices/s), ``cpu_ms_per_invoice`` (contender
    process + Prefect server), its parts ``client_`` / ``server_cpu_ms_per_invoice``,
    ``s3_server_`` / ``llm_server_cpu_ms_per_invoice``, ``first_llm_call_s`` (from the
    contender's start to the first request at the LLM server) and, for the pipeline,
    ``first_llm_call_after_flow_start_s`` (from the flow run entering Running, just
    before Prefect calls the flow function), ``llm_slot_utilisation``
    (LLM slots busy), ``peak_rss_mb``, plus everything `make bench` reports.
``ratios``
    pipeline over seed: wall time and client + server CPU per invoice, with the goals
    (<= 1.10 and <= 1.15) and whether they were met; the first LLM call after the flow
    function started, against 1.5 s.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.run import REPO_ROOT, console, ideal_s, interruptible, print_table, run_bench

DEFAULT_OUTPUT = REPO_ROOT / "bench-saturation.json"
WALL_GOAL = 1.10
CPU_GOAL = 1.15
FIRST_CALL_GOAL_S = 1.5
KEYS = (
    "status",
    "n",
    "wall_s",
    "throughput_per_s",
    "cpu_ms_per_invoice",
    "client_cpu_ms_per_invoice",
    "server_cpu_ms_per_invoice",
    "s3_server_cpu_ms_per_invoice",
    "llm_server_cpu_ms_per_invoice",
    "first_llm_call_s",
    "first_llm_call_after_flow_start_s",
    "llm_slot_utilisation",
    "llm_max_in_flight",
    "peak_rss_mb",
    "wall_over_ideal",
    "manifest_writes",
    "lost_updates",
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _ratio(pipeline: dict[str, Any], seed: dict[str, Any], key: str) -> float | None:
    if pipeline.get(key) and seed.get(key):
        return round(pipeline[key] / seed[key], 3)
    return None


def saturation_document(bench: dict[str, Any]) -> dict[str, Any]:
    """bench-saturation.json from `run_bench`'s document."""
    contenders = {
        name: {key: detail.get(key) for key in KEYS} | {"detail": detail}
        for name, detail in bench["contenders"].items()
    }
    seed, pipeline = contenders.get("seed", {}), contenders.get("pipeline", {})
    wall = _ratio(pipeline, seed, "wall_s")
    cpu = _ratio(pipeline, seed, "cpu_ms_per_invoice")
    first = pipeline.get("first_llm_call_after_flow_start_s")
    return {
        "n": bench["n"],
        "latency_s": bench["latency_s"],
        "concurrency": bench["concurrency"],
        "ideal_s": ideal_s(bench["n"], bench["concurrency"], bench["latency_s"]),
        "contenders": contenders,
        "ratios": {
            "wall_pipeline_over_seed": wall,
            "wall_goal": WALL_GOAL,
            "wall_met": wall is not None and wall <= WALL_GOAL,
            "cpu_pipeline_over_seed": cpu,
            "cpu_goal": CPU_GOAL,
            "cpu_met": cpu is not None and cpu <= CPU_GOAL,
            "first_llm_call_goal_s": FIRST_CALL_GOAL_S,
            "first_llm_call_met": first is not None and first <= FIRST_CALL_GOAL_S,
        },
    }


@app.command()
def main(
    n: Annotated[int, typer.Option("--n", min=1, help="Invoices per contender.")] = 5000,
    latency: Annotated[float, typer.Option(min=0, help="LLM latency L in seconds.")] = 2.0,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="LLM concurrency C.")] = 256,
    output: Annotated[Path, typer.Option(help="Where to write the JSON.")] = DEFAULT_OUTPUT,
    seed: Annotated[int, typer.Option(help="Corpus seed.")] = 0,
    profile: Annotated[
        Path | None, typer.Option(help="py-spy the pipeline and the Prefect server into DIR.")
    ] = None,
    keep_workdir: Annotated[bool, typer.Option(help="Keep the temp dir with all logs.")] = False,
) -> None:
    """Seed against pipeline at saturation; writes bench-saturation.json."""
    with tempfile.TemporaryDirectory(prefix="invoiceflow-saturation-") as tmp, interruptible():
        bench = run_bench(
            n=n,
            latency_s=latency,
            concurrency=concurrency,
            naive_n=0,
            contenders=["seed", "pipeline"],
            output=Path(tmp) / "bench.json",
            corpus_seed=seed,
            timeout_s=None,
            profile_dir=profile,
            keep_workdir=keep_workdir,
        )
    print_table(bench)
    doc = saturation_document(bench)
    output.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"ratios: {doc['ratios']}")
    console.print(f"wrote {output}")
    if any(d["status"] != "ok" for d in doc["contenders"].values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
