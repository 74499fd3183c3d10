"""Text summary of py-spy "raw" (collapsed stack) profiles: where the CPU went.

    uv run python -m benchmarks.profile_summary PROFILE_DIR_OR_FILE...

For each profile: the share of samples whose innermost frame lives in each package
(self time by package), and the functions with the most inclusive time among
invoiceflow/flows code and Prefect's own entry points.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r"(?:site|dist)-packages/(?P<pkg>[^/]+)")
_STDLIB = re.compile(r"/python3\.\d+/(?P<mod>[^/]+)")


def _package(file: str) -> str:
    if m := _SITE.search(file):
        return m.group("pkg").removesuffix(".py")
    for own in ("invoiceflow", "flows", "blocks", "benchmarks"):
        if file.startswith(f"{own}/") or f"/{own}/" in file:
            return own
    if m := _STDLIB.search(file):
        return f"stdlib:{m.group('mod').removesuffix('.py')}"
    return file or "?"


def _frames(stack: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw in stack.split(";"):
        m = _FRAME.match(raw.strip())
        if m:
            out.append((m.group("func"), m.group("file")))
    return out


def load(path: Path) -> tuple[Counter[str], Counter[str], int]:
    """(self samples by package, inclusive samples by function, total samples)."""
    by_package: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        by_package[_package(frames[-1][1])] += count
        seen: set[str] = set()
        for func, file in frames:
            pkg = _package(file)
            if pkg.startswith("stdlib") or pkg in ("?",):
                continue
            name = f"{pkg}: {func} ({Path(file).name})"
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
    return by_package, inclusive, total


def summarize_file(path: Path, console: Console, top: int = 15) -> None:
    by_package, inclusive, total = load(path)
    if not total:
        console.print(f"{path}: no samples")
        return
    table = Table(title=f"{path.name}: {total} samples, self time by package")
    table.add_column("package")
    table.add_column("share", justify="right")
    for pkg, count in by_package.most_common(top):
        table.add_row(pkg, f"{count / total:.1%}")
    console.print(table)
    table = Table(title=f"{path.name}: inclusive time, top functions")
    table.add_column("function")
    table.add_column("share", justify="right")
    for name, count in inclusive.most_common(top * 2):
        table.add_row(name, f"{count / total:.1%}")
    console.print(table)


def summarize_dir(path: Path, console: Console) -> None:
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    for file in files:
        summarize_file(file, console)


if __name__ == "__main__":
    out = Console(width=160)
    for arg in sys.argv[1:]:
        summarize_dir(Path(arg), out)
