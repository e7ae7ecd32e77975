"""jobs.allocator: large freed blocks stay in the process (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes() -> int:
    """glibc's count of bytes in blocks it serves with their own mmap (mallinfo2().hblkhd)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().hblkhd)


def test_a_batch_sized_tensor_comes_from_the_heap_once_freed_memory_is_kept() -> None:
    assert keep_freed_memory()
    before = _mmapped_bytes()
    t = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: above glibc's largest default mmap threshold
    assert _mmapped_bytes() == before
    del t


def test_nrm_keep_freed_memory_0_leaves_glibc_returning_big_blocks() -> None:
    code = ("import torch, test_allocator as t; from jobs.allocator import keep_freed_memory; "
            "kept = keep_freed_memory(); b = t._mmapped_bytes(); x = torch.ones(64 << 20, dtype=torch.uint8); "
            "print(kept, t._mmapped_bytes() - b)")
    env = {**os.environ, "NRM_KEEP_FREED_MEMORY": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[2])])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    kept, mmapped = r.stdout.split()
    assert kept == "False" and int(mmapped) >= 64 << 20
