"""The numeric precision a pass runs in (nrm.names.PRECISIONS), as a context manager.

    fp32   float32 throughout; on CUDA, TF32 off (cuDNN's convolutions included)
    bf16   torch.autocast to bfloat16 on the device
    fp16   torch.autocast to float16 on the device
    tf32   float32 storage, TF32 matmuls and convolutions on CUDA (plain float32 on a CPU)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from nrm.names import PRECISIONS


def check(precision: str) -> str:
    """``precision``, or a ValueError listing PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    return precision


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The context a pass on ``device_type`` ("cpu", "cuda") runs in, for ``precision``."""
    if check(precision) in ("bf16", "fp16"):
        return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return _tf32(precision == "tf32")


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on CUDA on (``on``) or off for the duration (restored after).
    Off matters: torch lets cuDNN run float32 convolutions in TF32 by default, which on an H200
    moved latent_prior by 5e-3 relative between two memory formats of the same batch."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
