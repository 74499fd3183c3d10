"""Measuring from outside: CPU of server process trees, corpus generation and upload."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import psutil

from invoiceflow.samples import corpus_seed, generate_invoice
from invoiceflow.storage import S3Store


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and all its descendants.

    Live descendants count through their own times, finished and reaped ones through
    their parent's `children_*` times, so a child exiting mid-window is not lost.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass
class CpuWindow:
    """CPU a process tree spent between `start()` and `stop()`."""

    pid: int
    started_cpu_s: float = 0.0
    started_at: float = 0.0
    cpu_s: float = 0.0
    seconds: float = 0.0

    def start(self) -> CpuWindow:
        self.started_cpu_s = tree_cpu_s(self.pid)
        self.started_at = time.monotonic()
        return self

    def stop(self) -> CpuWindow:
        self.cpu_s = tree_cpu_s(self.pid) - self.started_cpu_s
        self.seconds = time.monotonic() - self.started_at
        return self


def cpu_rate(pid: int, seconds: float) -> float:
    """Cores `pid`'s tree keeps busy, averaged over the next `seconds`."""
    window = CpuWindow(pid).start()
    time.sleep(seconds)
    return window.stop().cpu_s / seconds


def wait_until_quiet(
    pid: int, *, threshold_cores: float, window_s: float = 1.0, timeout_s: float = 60.0
) -> float:
    """Block until `pid`'s tree stays under `threshold_cores` for two windows in a row.

    The Prefect server records task runs and events asynchronously after the client
    is done; that work belongs to the run that caused it. Returns the seconds waited.
    """
    start = time.monotonic()
    quiet = 0
    while time.monotonic() - start < timeout_s and quiet < 2:
        quiet = quiet + 1 if cpu_rate(pid, window_s) < threshold_cores else 0
    return time.monotonic() - start


def find_child(cmd_fragment: str) -> int | None:
    """Pid of this process's child whose command line contains `cmd_fragment`."""
    for child in psutil.Process().children(recursive=True):
        try:
            if cmd_fragment in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- corpus


def _generate_range(seed: int, start: int, stop: int) -> list[tuple[str, bytes]]:
    # Same stems and seeds as `invoiceflow.samples.generate_corpus`, in a slice of it.
    return [
        (f"invoice-{i:04d}", generate_invoice(corpus_seed(seed, i))[0]) for i in range(start, stop)
    ]


def generate_pdfs(n: int, *, seed: int = 0, workers: int | None = None) -> list[tuple[str, bytes]]:
    """`n` sample invoice PDFs (stem, bytes), rendered on every core (fpdf2 is CPU-bound)."""
    workers = max(1, min(workers or os.cpu_count() or 1, -(-n // 50)))
    if workers == 1:
        return _generate_range(seed, 0, n)
    step = -(-n // (workers * 4))
    bounds = [(start, min(start + step, n)) for start in range(0, n, step)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = pool.map(_generate_range, [seed] * len(bounds), *zip(*bounds, strict=True))
        return [item for part in parts for item in part]


def upload_pdfs(
    s3: S3Store, prefix: str, pdfs: Iterable[tuple[str, bytes]], *, threads: int = 16
) -> int:
    """Put every PDF under `prefix` in parallel; returns how many were written."""

    def put(item: tuple[str, bytes]) -> None:
        stem, body = item
        s3.put(f"{prefix}{stem}.pdf", body, content_type="application/pdf")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(1 for _ in pool.map(put, pdfs))
