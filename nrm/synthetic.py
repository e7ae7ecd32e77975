"""Synthetic OOD images made from a user's own in-distribution images: a validation OOD set for users
who have none (docs/study-default-detector.md).

Each transform maps uint8 images (N, H, W, C) to N images of the same shape and dtype, seeded by a
torch.Generator:

    permute   each image's H*W pixels in a random order (colours kept, every structure gone)
    patches   each image cut into a 4 x 4 grid of tiles, the tiles put back in a random order
              (local texture kept, global shape gone); H and W must be divisible by 4
    blur      Gaussian blur with sigma = H / 8 pixels (reflect padding): a low-variance image
    invert    255 - x (every intensity reversed)
    noise     uniform random pixels (nothing of the input but its shape)
    mix       the pixel mean of each image and another one of the batch (a random derangement)

Only ``patches`` chooses a detector (nrm.detectors.default): on six networks, choosing on it alone
picked what the real validation OOD sets picked; the other five did not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

GRID = 4  # patches: tiles per side
BLUR_SIGMA = 1 / 8  # blur: sigma as a fraction of the image height


class SyntheticError(ValueError):
    """Images a transform cannot take; the message names their shape and what was expected."""


def permute(x: Tensor, gen: torch.Generator) -> Tensor:
    n, h, w, c = x.shape
    order = torch.rand(n, h * w, generator=gen).argsort(dim=1)  # (N, HW)
    return x.reshape(n, h * w, c).gather(1, order[:, :, None].expand(-1, -1, c)).reshape(x.shape)


def patches(x: Tensor, gen: torch.Generator) -> Tensor:
    n, h, w, c = x.shape
    if h % GRID or w % GRID:
        raise SyntheticError(f"patches: images of {h}x{w} pixels do not split into a {GRID}x{GRID} grid; "
                             f"expected a height and width divisible by {GRID}")
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


def transform(name: str, images: Tensor, seed: int = 0) -> Tensor:
    """Transform ``name`` of TRANSFORMS applied to ``images`` (N, H, W, C) uint8, seeded seed + its
    index in TRANSFORMS (so each transform draws its own numbers)."""
    if name not in TRANSFORMS:
        raise SyntheticError(f"unknown transform {name!r}; expected one of {list(TRANSFORMS)}")
    return TRANSFORMS[name](images, torch.Generator().manual_seed(seed + list(TRANSFORMS).index(name)))


def synthetic(images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Every transform of TRANSFORMS applied to ``images`` (N, H, W, C) uint8 (:func:`transform`)."""
    return {name: transform(name, images, seed) for name in TRANSFORMS}
