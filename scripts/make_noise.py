"""Uniform-noise OOD sets: N images of uniform random pixels as PNG in the HF image layout.

    python scripts/make_noise.py OUT.parquet --n 2000 --size 32 --channels 3 [--seed 0]
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3, choices=[1, 3])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    cells = []
    for i in range(a.n):
        px = rng.integers(0, 256, (a.size, a.size, a.channels), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px.squeeze(-1) if a.channels == 1 else px).save(buf, "PNG")
        cells.append({"bytes": buf.getvalue(), "path": f"noise-{i}.png"})
    pq.write_table(pa.table({"image": cells}), a.out)


if __name__ == "__main__":
    main()
