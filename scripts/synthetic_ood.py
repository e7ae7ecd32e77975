"""Synthetic OOD images made from a user's own in-distribution images (docs/study-default-detector.md).

Each transform maps uint8 images (N, H, W, C) to N images of the same shape and dtype, seeded by a
torch.Generator, in pure torch (so nrm/ can take them over as they are):

    permute   each image's H*W pixels in a random order (colours kept, every structure gone)
    patches   each image cut into a 4 x 4 grid of tiles, the tiles put back in a random order
              (local texture kept, global shape gone); H and W must be divisible by 4
    blur      Gaussian blur with sigma = H / 8 pixels (reflect padding): a low-variance image
    invert    255 - x (every intensity reversed)
    noise     uniform random pixels (nothing of the input but its shape)
    mix       the pixel mean of each image and another one of the batch (a random derangement)

    python scripts/synthetic_ood.py PARQUET OUT_DIR [--n 1000]   # writes OUT_DIR/<transform>/part-0.parquet
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = 4  # patches: tiles per side
BLUR_SIGMA = 1 / 8  # blur: sigma as a fraction of the image height


def permute(x: Tensor, gen: torch.Generator) -> Tensor:
    n, h, w, c = x.shape
    order = torch.rand(n, h * w, generator=gen).argsort(dim=1)  # (N, HW)
    return x.reshape(n, h * w, c).gather(1, order[:, :, None].expand(-1, -1, c)).reshape(x.shape)


def patches(x: Tensor, gen: torch.Generator) -> Tensor:
    n, h, w, c = x.shape
    if h % GRID or w % GRID:
        raise ValueError(f"patches: images of {h}x{w} pixels do not split into a {GRID}x{GRID} grid")
    ph, pw = h // GRID, w // GRID
    tiles = x.reshape(n, GRID, ph, GRID, pw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, GRID * GRID, ph, pw, c)
    order = torch.rand(n, GRID * GRID, generator=gen).argsort(dim=1)  # (N, G*G)
    tiles = tiles[torch.arange(n)[:, None], order]
    return tiles.reshape(n, GRID, GRID, ph, pw, c).permute(0, 1, 3, 2, 4, 5).reshape(x.shape)


def blur(x: Tensor, gen: torch.Generator) -> Tensor:
    n, h, w, c = x.shape
    sigma = BLUR_SIGMA * h
    r = min(math.ceil(3 * sigma), h - 1, w - 1)  # reflect padding needs r < the side
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x.permute(0, 3, 1, 2).float().reshape(n * c, 1, h, w)
    y = torch.nn.functional.pad(y, (r, r, r, r), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))  # along W
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))  # along H
    return y.reshape(n, c, h, w).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8)


def invert(x: Tensor, gen: torch.Generator) -> Tensor:
    return 255 - x


def noise(x: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 256, x.shape, generator=gen, dtype=torch.uint8)


def mix(x: Tensor, gen: torch.Generator) -> Tensor:
    n = len(x)
    other = (torch.arange(n) + torch.randint(1, max(n, 2), (n,), generator=gen)) % n  # never itself (n > 1)
    return ((x.int() + x[other].int() + 1) // 2).to(torch.uint8)


TRANSFORMS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "permute": permute, "patches": patches, "blur": blur, "invert": invert, "noise": noise, "mix": mix}


def synthetic(images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Every transform of TRANSFORMS applied to ``images`` (N, H, W, C) uint8, transform k seeded seed + k."""
    return {name: fn(images, torch.Generator().manual_seed(seed + k)) for k, (name, fn) in enumerate(TRANSFORMS.items())}


def main() -> None:
    from jobs.datasets import load_images, png_cells, probe_shape, write_hf_parquet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parquet")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    x = torch.from_numpy(load_images(a.parquet, probe_shape(a.parquet), a.n))
    for name, images in synthetic(x, a.seed).items():
        write_hf_parquet(a.out / name / "part-0.parquet", png_cells(images.numpy(), name))


if __name__ == "__main__":
    main()
