"""jobs.allocator: large freed blocks stay in the process (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

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
