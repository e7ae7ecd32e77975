"""A whole `nrm-ood score` job with its scoring actors on the GPU (scripts/gpu_check.sh, step 3).

    python scripts/gpu_job.py OUT_DIR [ROWS]
Writes ROWS (default 200,000) generated 32x32 RGB PNG images as Parquet shards, a random ResNet-20
shaped NRM with the default detector, runs the job on embedded Ray with one actor per GPU
(--gpus-per-actor 1, batch 2048) and prints the manifest's row counts and images/s."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import nrm
from jobs.bench.job import write_shards
from jobs.bench.timing import random_model
from nrm.fit import fit


def main(out: Path, rows: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(nrm.preset("resnet-cifar", 1.0, depth=20))
    x = torch.randn(512, 3, 32, 32)
    fit(model, [x], [x], detector="mahalanobis")
    nrm.save(model, out / "ckpt")
    write_shards(out / "data", rows, 32, (3, 32, 32))
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "jobs.cli", "score", "--model", str(out / "ckpt"), "--input", str(out / "data"),
           "--output", str(out / "scores"), "--gpus-per-actor", "1", "--batch-size", "2048"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout, r.stderr, sep="\n")
    manifest = next((out / "scores").glob("*/_manifest.json"), None)
    if r.returncode != 0 or manifest is None:
        raise SystemExit(f"the job failed (exit {r.returncode})")
    m = json.loads(manifest.read_text())
    print(json.dumps({"rows": m["rows"], "timings": m.get("timings"), "wall_s": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 200_000)
