"""A stride-2 convolution's input gradient three ways (docs/benchmarks.md section 7).

    python scripts/strided_vjp.py

At ResNet-20's two strided layers (16 -> 32 channels at 32x32, 32 -> 64 at 16x16; 3x3, padding 1,
batch 512, channels_last float32, 2 threads, best of 10 after a warm-up): the forward convolution, oneDNN's input
gradient (what autograd runs), the transposed convolution, and a sub-pixel decomposition (each of
the four output phases as one stride-1 convolution with the kernel taps that reach it, written into
its phase). Prints the times and the sub-pixel result's largest difference from autograd's."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.allocator import keep_freed_memory  # noqa: E402
from jobs.bench.timing import best_time  # noqa: E402


def input_grad(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """autograd's: d/dx of conv2d(x, w, stride 2, padding 1) against g."""
    return torch.ops.aten.convolution_backward(g, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]


def sub_pixel(g: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    """The same gradient as four stride-1 convolutions: output row 2i + a takes the taps ky with
    a + 1 - ky even, reading g at row i + (a + 1 - ky) / 2 (likewise for columns)."""
    out = torch.empty(g.shape[0], w.shape[1], size, size).contiguous(memory_format=torch.channels_last)
    gp = F.pad(g, (1, 1, 1, 1))
    half = size // 2
    for a in (0, 1):
        for b in (0, 1):
            ky = [k for k in range(3) if (a + 1 - k) % 2 == 0]
            kx = [k for k in range(3) if (b + 1 - k) % 2 == 0]
            oy, ox = [(a + 1 - k) // 2 for k in ky], [(b + 1 - k) // 2 for k in kx]
            wk = w[:, :, ky][:, :, :, kx].flip(2, 3)  # offsets descend with the tap index: flip to ascend
            g_in = gp[:, :, 1 + min(oy) : 1 + min(oy) + half + len(oy) - 1, 1 + min(ox) : 1 + min(ox) + half + len(ox) - 1]
            out[:, :, a::2, b::2] = F.conv2d(g_in, wk.transpose(0, 1).contiguous(memory_format=torch.channels_last))
    return out


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    print("layer | forward (ms) | input gradient, autograd (ms) | transposed conv (ms) | sub-pixel (ms) | max |diff|")
    for cin, cout, size in ((16, 32, 32), (32, 64, 16)):
        x = torch.randn(512, cin, size, size).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3).contiguous(memory_format=torch.channels_last)
        g = torch.randn(512, cout, size // 2, size // 2).contiguous(memory_format=torch.channels_last)
        diff = (sub_pixel(g, w, size) - input_grad(g, x, w)).abs().max().item()
        runs = (lambda: F.conv2d(x, w, None, 2, 1), lambda: input_grad(g, x, w),  # noqa: B023
                lambda: F.conv_transpose2d(g, w, None, 2, 1, 1), lambda: sub_pixel(g, w, size))  # noqa: B023
        times = " | ".join(f"{best_time(fn, 10) * 1e3:.2f}" for fn in runs)
        print(f"{cin} -> {cout} at {size}x{size} | {times} | {diff:.1e}")


if __name__ == "__main__":
    main()
