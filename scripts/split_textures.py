"""Split textures32 into a validation half (for choices) and a report half, by the seeded permutation
that scripts/normaliser_comparison.py and scripts/ood_experiments.py use.

    python scripts/split_textures.py ../shared/datasets/textures32/test OUT_DIR
writes OUT_DIR/textures32-val/part-0.parquet and OUT_DIR/textures32-report/part-0.parquet.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main(src: str, out: str) -> None:
    files = sorted(Path(src).glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    order = np.random.default_rng(0).permutation(table.num_rows)
    half = table.num_rows // 2
    for name, idx in (("textures32-val", order[:half]), ("textures32-report", order[half:])):
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(pa.array(np.sort(idx))), Path(out) / name / "part-0.parquet")
        print(f"{name}: {len(idx)} rows")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
