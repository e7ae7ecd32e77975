"""Scaling measurements for docs/scaling.md (not a test): many tiny input files, local and on S3 (moto).

Subcommands, each measured in a fresh process so that its peak RSS (ru_maxrss) is the driver's own:

    scaling.py make DIR --files N --rows R          # N copies of one R-row 8x8 PNG shard, in DIR (use /tmp)
    scaling.py upload DIR BUCKET --endpoint URL     # the same files into s3://BUCKET/<basename of DIR>/
    scaling.py plan URI [--endpoint URL]            # listing + plan_inputs only: seconds and driver peak RSS
    scaling.py run URI OUT MODEL [--endpoint URL]   # a whole `score` run: plan / score / commit split,
                                                    # output files, manifest bytes, driver peak RSS

Each prints one JSON line. docs/scaling.md quotes them with the machine and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def peak_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def make(root: Path, files: int, rows: int) -> dict[str, Any]:
    from jobs.datasets import png_cells, write_hf_parquet

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    first = root / "f0000000.parquet"
    write_hf_parquet(first, png_cells(rng.integers(0, 256, (rows, 8, 8), dtype=np.uint8), "x"),
                     rng.integers(0, 10, rows))
    for i in range(1, files):
        d = root / f"d{i // 1000:03d}"  # 1,000 files a directory
        d.mkdir(exist_ok=True)
        shutil.copyfile(first, d / f"f{i:07d}.parquet")
    return {"files": files, "rows": files * rows, "bytes_per_file": first.stat().st_size}


def upload(root: Path, bucket: str, endpoint: str) -> dict[str, Any]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    paths = sorted(root.rglob("*.parquet"))
    data = paths[0].read_bytes()  # every file is a copy of the first
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"{root.name}/{p.relative_to(root)}", Body=data),
                      paths))
    return {"uploaded": len(paths), "seconds": round(time.perf_counter() - t, 1)}


def plan(uri: str, endpoint: str | None) -> dict[str, Any]:
    from jobs.planning import plan_inputs, read_tasks
    from jobs.storage import Store

    store = Store(endpoint)
    t = time.perf_counter()
    files = store.list_parquet(uri)
    listed = time.perf_counter() - t
    p = plan_inputs(store, files, None, None, None)
    tasks = read_tasks(p.units)
    return {"uri": uri, "files": len(files), "rows": p.rows, "failed": len(p.failed), "read_tasks": len(tasks),
            "list_s": round(listed, 2), "plan_s": round(time.perf_counter() - t, 2), "driver_peak_mib": peak_mib()}


def run(uri: str, out: str, model: str, endpoint: str | None) -> dict[str, Any]:
    from jobs.pipeline import ScoreOptions, run_score
    from jobs.storage import Store

    t = time.perf_counter()
    r = run_score(ScoreOptions(model, uri, out, run_id=f"scale-{int(time.time())}", endpoint_url=endpoint),
                  echo=lambda _m: None)
    wall = time.perf_counter() - t
    m = r.manifest
    size = len(Store(endpoint).read_bytes(r.manifest_uri))
    return {"uri": uri, "status": r.status, "files": m["inputs"]["count"], "rows": m["rows"]["in"],
            "ok": m["rows"]["ok"], "output_files": m["outputs"]["count"], "manifest_bytes": size,
            **{k: round(v, 2) for k, v in r.timings.items()}, "wall_s": round(wall, 1), "driver_peak_mib": peak_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("make")
    a.add_argument("dir", type=Path)
    a.add_argument("--files", type=int, required=True)
    a.add_argument("--rows", type=int, default=10)
    a = sub.add_parser("upload")
    a.add_argument("dir", type=Path)
    a.add_argument("bucket")
    a.add_argument("--endpoint", required=True)
    for name in ("plan", "run"):
        a = sub.add_parser(name)
        a.add_argument("uri")
        if name == "run":
            a.add_argument("out")
            a.add_argument("model")
        a.add_argument("--endpoint", default=None)
    args = ap.parse_args()
    if args.cmd == "make":
        rec = make(args.dir, args.files, args.rows)
    elif args.cmd == "upload":
        rec = upload(args.dir, args.bucket, args.endpoint)
    elif args.cmd == "plan":
        rec = plan(args.uri, args.endpoint)
    else:
        rec = run(args.uri, args.out, args.model, args.endpoint)
    print(json.dumps({"cmd": args.cmd, **rec, "load_avg": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
