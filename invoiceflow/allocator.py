"""glibc malloc settings that keep a long run's memory to what it holds (issue 13 #4).

A run keeps each finished manifest entry (~0.6 KB of JSON text) until it ends, and
writes the whole manifest (~0.5 KB an invoice: 5 MB at 10,000) at every commit. Under
glibc's defaults the two together make the heap grow with the run's length rather than
with what it holds: the mmap threshold rises to the size of the largest block freed
(up to 32 MB, mallopt(3)), so after the first commit each manifest body is carved out
of the heap, between entries allocated since, instead of mapped and returned when
freed. At 10,000 invoices 29 MB of the heap was free but could not be returned; with
the threshold fixed, 12 MB. Elsewhere than glibc (musl, macOS) nothing is changed.

Both now live in files instead (`spill.py`: the finished entries, and each commit's
body); the fixed threshold stays for the other large buffers a run frees (documents,
listing pages), without a fresh measurement of its own.

Fewer arenas (M_ARENA_MAX 2) did not lower the peak and cost ~15% more CPU per invoice.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024  # glibc's default start, fixed: above it, buffers are mapped


def bound_heap_growth() -> bool:
    """Fix this process's mmap threshold as above; False where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
