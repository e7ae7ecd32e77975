"""Uniform-noise OOD sets: N images of uniform random pixels as PNG in the HF image layout.

    python scripts/make_noise.py OUT.parquet --n 2000 --size 32 --channels 3 [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jobs.datasets import png_cells, write_hf_parquet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=[1, 3])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    images = rng.integers(0, 256, (a.n, a.size, a.size, a.channels), dtype=np.uint8)
    write_hf_parquet(Path(a.out), png_cells(images, "noise"))

if __name__ == "__main__":
    main()
