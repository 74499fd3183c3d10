"""glibc malloc settings of a run's process (issue 13 #4: memory bounded at 10,000 invoices)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# After a 5 MB block is freed, glibc's default raises its mmap threshold to 5 MB: the
# next 1 MB buffer comes out of the heap. Mapped blocks are what mallinfo2 counts in hblks.
PROBE = """
import ctypes, sys
from invoiceflow.allocator import bound_heap_growth

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "bounded":
    assert bound_heap_growth()
del_me = bytearray(5 * 1024 * 1024)
del del_me
before = libc.mallinfo2().hblks
kept = bytearray(1024 * 1024)
print(libc.mallinfo2().hblks - before)
"""


def mapped_after_a_large_free(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_buffers_are_mapped_even_after_a_larger_one_was_freed() -> None:
    assert mapped_after_a_large_free("default") == 0  # glibc's sliding threshold
    assert mapped_after_a_large_free("bounded") == 1
