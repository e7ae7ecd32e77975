"""Write nrm.synthetic's OOD sets made from a Parquet image set's first rows, one Parquet per transform.

    python scripts/synthetic_ood.py PARQUET OUT_DIR [--n 1000] [--seed 0]   # OUT_DIR/<transform>/part-0.parquet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.datasets import load_images, png_cells, probe_shape, write_hf_parquet  # noqa: E402
from nrm.synthetic import synthetic  # noqa: E402


def main() -> None:
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
