"""Keep freed memory in the process, so each batch reuses the pages of the batch before.

torch's CPU tensors come from malloc. glibc serves every block above 32 MiB (its largest dynamic
mmap threshold) with a fresh mmap and gives it back to the kernel on free, and trims the heap top
above 128 KiB, so an activation of a 512-image batch (512 x 16 x 32 x 32 float32 = 32 MiB) is
page-faulted in anew at every op (docs/benchmarks.md section 7 measures what that
costs a ReLU). Raising both thresholds to 1 GiB keeps freed
blocks in the heap for the next allocation. The process keeps its peak memory (it would reach the
same peak at the next batch anyway); blocks above 1 GiB still come and go with mmap.

Called by the scoring actors, the CLI and the bench (plain inference included: the bench's
ratios compare both sides with the same allocator). A no-op where the C library is not glibc, and
where the environment sets NRM_KEEP_FREED_MEMORY=0 (for a container whose memory limit is tight:
the process then returns what it frees, and scores slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

ENV = "NRM_KEEP_FREED_MEMORY"  # "0" turns it off
KEEP_BYTES = 1 << 30  # mmap and trim thresholds: blocks up to 1 GiB stay in the process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES for this process; once per process.
    Returns whether it took effect (False on a C library without mallopt, e.g. musl or macOS, or
    with NRM_KEEP_FREED_MEMORY=0)."""
    if os.environ.get(ENV) == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
