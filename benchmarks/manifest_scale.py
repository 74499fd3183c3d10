"""One manifest commit at scale: latency and object size with 100,000 entries.

    uv run python -m benchmarks.manifest_scale --entries 100000
    uv run python -m benchmarks.run --scale-manifest 100000      # same thing

Starts moto's S3 server on a free port, writes a manifest of `entries` realistic `done`
entries, then times group commits through the real `ManifestStore` (asyncio.Lock,
conditional write): 1 and 1000 new claims (what `claim` commits), and 1 and 16
invoices claimed and finished with the pipeline's own done update (`RecordDone`,
which looks for a duplicate invoice at commit time). Each is timed

* broken down, with the store's own steps: read (`read_sync`: GET + decode), of which
  GET is the S3 transfer alone, apply (the updates on the decoded entries), encode (the
  store's `_encode`), write (`put_conditional` with If-Match);
* end to end, `await store.commit(updates)`, right after another writer changed the
  object (nothing read before can be reused) and back to back with the store's own
  previous commit (a store that keeps its snapshot can skip the download).

An in-memory table compares the size and CPU of a few other encodings of the entries.

Whatever encoding `ManifestStore` uses is what gets measured, so the numbers follow the
lead's choice of encoding without changes here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from invoiceflow import defaults, stack
from invoiceflow.manifest import (
    Claim,
    ManifestEntry,
    ManifestStore,
    Snapshot,
    Status,
    Transition,
    Update,
)
from invoiceflow.storage import S3Store, make_s3_client

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "bench-manifest-scale.json"
UpdateKind = Literal["claim", "done"]
MANIFEST_KEY = defaults.MANIFEST_KEY
TARGET_COMMIT_S = 1.0
# Claims: what `claim` commits. Done: what finishing invoices commits; at C=32, L=2 s
# about 16 invoices finish per second, i.e. per default 1 s commit interval.
DEFAULT_BATCHES: tuple[tuple[UpdateKind, int], ...] = (
    ("claim", 1),
    ("claim", 1000),
    ("done", 1),
    ("done", 16),
)

console = Console(width=None if sys.stdout.isatty() else 150)
T = TypeVar("T")


@contextmanager
def moto_server() -> Iterator[str]:
    port = stack.free_port()
    proc = subprocess.Popen(
        [stack._bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        stack._wait_healthy(url, proc.pid, Path("/dev/null"), 30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def realistic_entries(count: int) -> dict[str, dict[str, Any]]:
    """`count` finished invoices shaped like the pipeline writes them."""
    now = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    entries: dict[str, dict[str, Any]] = {}
    for i in range(count):
        key = f"incoming/2026-11/vendor-{i % 997:03d}/invoice-{i:07d}.pdf"
        entries[key] = ManifestEntry(
            status=Status.done,
            source_etag=f"{i:032x}",
            attempts=1,
            run_id="0b5e8f0e-4c1e-4f7e-9a56-3d2b4b1f9c2a",
            extractor="openai",
            result_key=f"results/2026-11__vendor-{i % 997:03d}__invoice-{i:07d}.json",
            created_at=now,
            updated_at=now,
            vendor_name=f"Vendor {i % 997} GmbH",
            total=f"{(i * 37) % 100000}.{i % 100:02d}",
            currency="EUR",
            **_known_fields(_done_details(i)),
        ).model_dump(mode="json")
    return entries


def _done_details(i: int) -> dict[str, Any]:
    """What the pipeline adds to a done entry besides the basics (as of this writing)."""
    return {
        "invoice_number": f"INV-2026-{i:07d}",
        "vendor_tax_id": f"DE{i % 997:09d}",
        "source": "llm",
        "model": "gpt-4o-mini",
        "tokens_in": 900 + i % 700,
        "tokens_out": 200 + i % 150,
        "cost": f"0.000{i % 10}",
        "truncated": False,
        "needs_review": False,
    }


def _known_fields(fields: dict[str, Any]) -> dict[str, Any]:
    # Only what ManifestEntry declares, so the harness survives schema changes.
    return {k: v for k, v in fields.items() if k in ManifestEntry.model_fields}


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def updates_for(kind: UpdateKind, batch: int, round_no: int) -> list[Update]:
    """`batch` new invoices claimed; for "done", also finished in the same commit.

    "done" uses the pipeline's own done update (`RecordDone`, which checks for a
    duplicate invoice under the lock) when it exists, else a plain `Transition`.
    """
    keys = [f"incoming/2026-12/new-{round_no:03d}-{i:05d}.pdf" for i in range(batch)]
    updates: list[Update] = [Claim(k, f"{i:032x}", "bench-run") for i, k in enumerate(keys)]
    if kind == "done":
        updates += [_done_update(k, 1_000_000 * round_no + i) for i, k in enumerate(keys)]
    return updates


def _done_update(key: str, i: int) -> Update:
    fields = {
        "result_key": f"results/{key.removesuffix('.pdf')}.json",
        "extractor": "openai",
        "vendor_name": f"Vendor {i % 997} GmbH",
        "total": "100.00",
        "currency": "EUR",
        **_known_fields(_done_details(i)),
    }
    transition = Transition(key, 1, Status.done, fields)
    try:
        from invoiceflow.duplicates import RecordDone
    except ImportError:
        return transition
    return RecordDone(transition)


def breakdown(
    store: ManifestStore, kind: UpdateKind, batch: int, round_no: int
) -> dict[str, float]:
    """One commit, step by step, with the store's own read, encode and conditional write."""
    _obj, get_s = timed(lambda: store.s3.get(store.key, max_bytes=store.max_bytes))
    snap, read_s = timed(store.read_sync)
    now = dt.datetime.now(dt.UTC)
    updates = updates_for(kind, batch, round_no)
    _outcomes, apply_s = timed(lambda: [u.apply(snap.entries, now) for u in updates])
    encode: Callable[[Snapshot, int, dt.datetime], BinaryIO] = store._encode
    body, encode_s = timed(lambda: encode(snap, snap.revision + 1, now))
    size = os.fstat(body.fileno()).st_size  # a file, written and rewound by `_encode`
    _etag, write_s = timed(lambda: store.s3.put_conditional(store.key, body, if_match=snap.etag))
    return {
        "read_ms": read_s * 1000,
        "get_ms": get_s * 1000,
        "decode_ms": max(read_s - get_s, 0.0) * 1000,
        "apply_ms": apply_s * 1000,
        "encode_ms": encode_s * 1000,
        "write_ms": write_s * 1000,
        "total_ms": (read_s + apply_s + encode_s + write_s) * 1000,
        "bytes": size,
        "entries": len(snap.entries),
    }


def commit_ms(
    runner: asyncio.Runner, store: ManifestStore, kind: UpdateKind, batch: int, round_no: int
) -> float:
    """One `store.commit` of `updates_for(kind, batch)`, end to end, in milliseconds."""
    start = time.perf_counter()
    runner.run(store.commit(updates_for(kind, batch, round_no)))
    return (time.perf_counter() - start) * 1000


def encoding_alternatives(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Size and CPU of a few encodings of the same entries, in memory (no S3).

    Object size drives the S3 GET and PUT of every commit, so it matters as much as
    encode/decode CPU. Only stdlib and orjson (a dependency) are tried.
    """
    import zlib

    import orjson

    compact = {k: {f: v for f, v in e.items() if v is not None} for k, e in entries.items()}
    candidates: dict[str, tuple[Callable[[], bytes], Callable[[bytes], object]]] = {
        "orjson": (lambda: orjson.dumps(entries), orjson.loads),
        "orjson, nulls dropped": (lambda: orjson.dumps(compact), orjson.loads),
        "orjson, nulls dropped, zlib 1": (
            lambda: zlib.compress(orjson.dumps(compact), 1),
            lambda b: orjson.loads(zlib.decompress(b)),
        ),
        "orjson, zlib 6": (
            lambda: zlib.compress(orjson.dumps(entries), 6),
            lambda b: orjson.loads(zlib.decompress(b)),
        ),
        "json (stdlib)": (
            lambda: json.dumps(entries, separators=(",", ":")).encode(),
            json.loads,
        ),
    }
    rows = []
    for name, (encode, decode) in candidates.items():
        body, encode_s = timed(encode)
        _doc, decode_s = timed(lambda b=body, d=decode: d(b))
        rows.append(
            {
                "encoding": name,
                "bytes": len(body),
                "encode_ms": round(encode_s * 1000, 1),
                "decode_ms": round(decode_s * 1000, 1),
            }
        )
    return rows


def run_scale(
    *,
    entries: int = 100_000,
    batches: tuple[tuple[UpdateKind, int], ...] = DEFAULT_BATCHES,
    repeat: int = 3,
    output: Path = DEFAULT_OUTPUT,
) -> dict[str, Any]:
    console.print(f"building {entries} manifest entries ...")
    initial = realistic_entries(entries)
    alternatives = encoding_alternatives(initial)
    with moto_server() as endpoint, asyncio.Runner() as runner:
        s3 = S3Store(
            make_s3_client(
                endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench"
            ),
            "manifest-scale",
        )
        s3.ensure_bucket()
        lock = asyncio.Lock()
        store = ManifestStore(s3, MANIFEST_KEY, lock=lambda: lock)
        now = dt.datetime.now(dt.UTC)
        s3.put_conditional(
            MANIFEST_KEY, store._encode(Snapshot(initial, None, 0), 1, now), if_match=None
        )
        del initial
        rows: list[dict[str, Any]] = []
        round_no = 0
        for kind, batch in batches:
            console.print(f"timing commits of {batch} {kind} ...")
            steps: list[dict[str, float]] = []
            after_other_writer: list[float] = []
            back_to_back: list[float] = []
            for _ in range(repeat):
                round_no += 1
                # The breakdown writes behind the store's back, like another run would:
                # the next commit cannot reuse anything it read before.
                steps.append(breakdown(store, kind, batch, round_no))
                round_no += 1
                after_other_writer.append(commit_ms(runner, store, kind, batch, round_no))
                round_no += 1
                # Nobody wrote since this store's own commit: a store that keeps its
                # last snapshot can skip the download and parse.
                back_to_back.append(commit_ms(runner, store, kind, batch, round_no))
            row: dict[str, Any] = {"updates": kind, "batch": batch}
            for name in steps[0]:
                row[name] = round(statistics.median(s[name] for s in steps), 1)
            row["commit_ms_after_other_writer"] = round(statistics.median(after_other_writer), 1)
            row["commit_ms_back_to_back"] = round(statistics.median(back_to_back), 1)
            row["commit_ms_max"] = round(max(after_other_writer + back_to_back), 1)
            rows.append(row)
    doc = {
        "entries": entries,
        "repeat": repeat,
        "target_commit_s": TARGET_COMMIT_S,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "commits": rows,
        "encodings": alternatives,
    }
    print_table(doc)
    output.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {output}")
    return doc


def print_table(doc: dict[str, Any]) -> None:
    table = Table(
        title=f"one manifest commit at {doc['entries']} entries (median of {doc['repeat']})",
        caption="read = get + decode; total = read + apply + encode + write. Commits through "
        "store.commit: after another writer, and back to back. Target: one commit ≤ 1 s",
    )
    columns = [
        *(
            "updates",
            "batch",
            "read_ms",
            "get_ms",
            "decode_ms",
            "apply_ms",
            "encode_ms",
            "write_ms",
        ),
        *("total_ms", "commit_ms_after_other_writer", "commit_ms_back_to_back", "bytes"),
    ]
    for column in columns:
        title = column.removesuffix("_ms").replace("_", " ")
        table.add_column(title + (" ms" if column.endswith("_ms") else ""), justify="right")
    limit_ms = doc["target_commit_s"] * 1000
    for row in doc["commits"]:
        cells = []
        for column in columns:
            value = row[column]
            text = f"{value:,.0f}" if column == "bytes" else str(value)
            if column.startswith("commit_ms") and row[column] > limit_ms:
                text = f"[red]{text}[/]"
            cells.append(text)
        table.add_row(*cells)
    console.print(table)
    table = Table(title="the same entries in other encodings (in memory, no S3)")
    for column in ("encoding", "bytes", "encode ms", "decode ms"):
        table.add_column(column, justify="left" if column == "encoding" else "right")
    for alt in doc["encodings"]:
        table.add_row(
            alt["encoding"], f"{alt['bytes']:,}", str(alt["encode_ms"]), str(alt["decode_ms"])
        )
    console.print(table)
    console.print(
        f"peak RSS of this process: {doc['peak_rss_mb']:.0f} MB; "
        f"load average at the end: {doc['load_avg_1m']}"
    )


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    entries: Annotated[int, typer.Option(min=1, help="Entries in the manifest.")] = 100_000,
    repeat: Annotated[int, typer.Option(min=1, help="Commits per batch size.")] = 3,
    output: Annotated[Path, typer.Option(help="Where to write the JSON.")] = DEFAULT_OUTPUT,
) -> None:
    """Time one manifest commit (read, apply, encode, write) at scale."""
    run_scale(entries=entries, repeat=repeat, output=output)


if __name__ == "__main__":
    app()
