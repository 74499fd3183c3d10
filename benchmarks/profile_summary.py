"""Text summary of py-spy "raw" (collapsed stack) profiles: where the CPU went.

    uv run python -m benchmarks.profile_summary PROFILE_DIR_OR_FILE...

For each profile it prints three tables:

1. Samples by where the innermost frame is: a library, our code (invoiceflow/flows),
   imports, or waiting. py-spy counts some blocked threads as active: those sitting in
   `select`, in a socket read or in a lock/condition wait. They are grouped as
   "(waiting)", because that is wall time, not CPU.
2. The hottest innermost functions, with the chain of callers that leads to them.
3. Inclusive time of our code's functions and Prefect's engine functions.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

OWN_PACKAGES = ("invoiceflow", "flows", "blocks")
# Innermost Python frames whose C call blocks (py-spy's idle heuristics miss some).
WAITING = {
    ("EpollSelector.select", "selectors.py"),
    ("SocketIO.readinto", "socket.py"),
    ("Condition.wait", "threading.py"),
    ("Event.wait", "threading.py"),
    ("Thread.join", "threading.py"),
    ("_worker", "thread.py"),
    ("poll_wait_for_socket.<locals>.do_poll", "wait.py"),
    ("Queue.get", "queue.py"),
    ("sleep", "time"),
}


class Frame(tuple[str, str, str]):
    """(function, path, line) of one py-spy frame, e.g. `run (asyncio/runners.py:190)`."""

    @classmethod
    def parse(cls, raw: str) -> Frame | None:
        func, sep, where = raw.rpartition(" (")
        if not sep or not where.endswith(")"):
            return None
        path, _, line = where[:-1].rpartition(":")
        if not path:
            path, line = where[:-1], ""
        return cls((func, path, line))

    @property
    def func(self) -> str:
        return self[0]

    @property
    def path(self) -> str:
        return self[1]

    @property
    def package(self) -> str:
        path = self.path
        if "importlib._bootstrap" in path:
            return "(imports)"
        top = path.split("/", 1)[0].removesuffix(".py")
        if top in OWN_PACKAGES or top == "benchmarks":
            return top
        if top in sys.stdlib_module_names or top.startswith("<frozen"):
            return f"stdlib:{top}"
        return top

    @property
    def waiting(self) -> bool:
        return (self.func, self.path.rsplit("/", 1)[-1]) in WAITING

    def label(self) -> str:
        return f"{self.func} ({self.path})"


def stacks(path: Path) -> list[tuple[list[Frame], int]]:
    out: list[tuple[list[Frame], int]] = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        # --subprocesses prefixes a `process PID:"cmdline"` root frame; drop it.
        frames = [f for raw in stack.split(";") if (f := Frame.parse(raw)) and f.path]
        frames = [f for f in frames if not f.func.startswith("process ")]
        if frames:
            out.append((frames, int(count_text)))
    return out


def category(frames: list[Frame]) -> str:
    leaf = frames[-1]
    if leaf.waiting:
        return "(waiting)"
    if any(f.package == "(imports)" for f in frames):
        return "(imports)"
    return leaf.package


def summarize_file(path: Path, console: Console, top: int = 15) -> None:
    data = stacks(path)
    total = sum(count for _, count in data)
    if not total:
        console.print(f"{path}: no samples")
        return
    by_category: Counter[str] = Counter()
    leaves: Counter[tuple[str, str]] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in data:
        cat = category(frames)
        by_category[cat] += count
        if cat in ("(waiting)", "(imports)"):
            continue
        callers = [f for f in frames[:-1] if not f.package.startswith("stdlib")][-3:]
        leaves[(frames[-1].label(), " <- ".join(f.func for f in reversed(callers)))] += count
        seen: set[str] = set()
        for f in frames:
            if f.package in OWN_PACKAGES or f.path.startswith(
                ("prefect/task_engine", "prefect/flow_engine", "prefect/concurrency")
            ):
                name = f.label()
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count

    table = Table(title=f"{path.name}: {total} samples by innermost frame")
    table.add_column("where")
    table.add_column("share", justify="right")
    for name, count in by_category.most_common(top):
        table.add_row(name, f"{count / total:.1%}")
    console.print(table)

    table = Table(title=f"{path.name}: hottest functions (self), with their callers")
    table.add_column("function")
    table.add_column("called from", overflow="fold")
    table.add_column("share", justify="right")
    for (leaf, chain), count in leaves.most_common(top):
        table.add_row(leaf, chain, f"{count / total:.1%}")
    console.print(table)

    if not inclusive:
        return
    table = Table(title=f"{path.name}: inclusive time of our code and Prefect's engine")
    table.add_column("function")
    table.add_column("share", justify="right")
    for name, count in inclusive.most_common(top):
        table.add_row(name, f"{count / total:.1%}")
    console.print(table)


def summarize_dir(path: Path, console: Console) -> None:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    for file in files:
        summarize_file(file, console)


if __name__ == "__main__":
    out = Console(width=180)
    for arg in sys.argv[1:]:
        summarize_dir(Path(arg), out)
