"""nrm.synthetic: OOD images made from in-distribution images."""

from __future__ import annotations

import pytest
import torch

from nrm.synthetic import GRID, SyntheticError, synthetic, transform


def images(n: int = 6, side: int = 8, channels: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, side, side, channels), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def tiles(x: torch.Tensor) -> torch.Tensor:
    """(N, GRID*GRID, tile pixels) of (N, H, W, C) images, the tiles of each image sorted."""
    n, h, w, c = x.shape
    t = x.reshape(n, GRID, h // GRID, GRID, w // GRID, c).permute(0, 1, 3, 2, 4, 5).reshape(n, GRID * GRID, -1)
    order = [sorted(range(GRID * GRID), key=lambda i, row=row: row[i].tolist()) for row in t]
    return torch.stack([row[o] for row, o in zip(t, order, strict=True)])


def test_patches_rearranges_each_images_own_tiles() -> None:
    x = images()
    assert torch.equal(tiles(transform("patches", x)), tiles(x))


def test_patches_moves_tiles() -> None:
    x = images()
    assert not torch.equal(transform("patches", x), x)


def test_patches_rejects_a_side_not_divisible_by_the_grid() -> None:
    with pytest.raises(SyntheticError, match=r"10x10 pixels .* divisible by 4"):
        transform("patches", images(side=10))


def test_a_transform_is_the_same_for_the_same_seed_as_in_the_full_set() -> None:
    x = images()
    assert torch.equal(transform("patches", x, seed=3), synthetic(x, seed=3)["patches"])


def test_an_unknown_transform_is_named() -> None:
    with pytest.raises(SyntheticError, match="'swirl'"):
        transform("swirl", images())
