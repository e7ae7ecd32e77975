"""Soak benchmark (not a test): many small images in many shards, through the local and the S3 job.

Generates ``--rows`` 8x8 grayscale PNG images (HF image layout) in ``--shards`` Parquet files, one
corrupt image in every 10th shard, and scores them with a random-initialised, fitted digits8 NRM:
1. local files -> local output, 2. the same shards on S3 (moto's server on 127.0.0.1) -> S3 output.
For each run it records throughput, peak RSS of the driver and every Ray process (jobs.bench.job.PeakRSS)
and the row accounting, checked by reading the committed output back: rows in == ok + error,
no duplicate id, no missing id. Prints a markdown table (docs/reliability.md quotes it) and a JSON line.

    nice .venv/bin/python scripts/soak.py --rows 200000 --shards 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

import nrm
from jobs import manifest
from jobs.bench.job import PeakRSS, request_counts, start_moto
from jobs.bench.timing import machine
from jobs.datasets import png_cells, write_hf_parquet
from jobs.pipeline import ScoreOptions, init_ray, run_score
from jobs.storage import Store


def write_shards(root: Path, rows: int, shards: int, row_group: int) -> int:
    """Smooth random 8x8 PNGs; shard s gets a corrupt image at row 7 when s % 10 == 0. Returns the bad rows."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    per, bad = -(-rows // shards), 0
    for s in range(shards):
        m = min(per, rows - s * per)
        if m <= 0:
            break
        base = rng.integers(0, 256, (m, 3, 3), dtype=np.uint8)
        images = np.stack([np.asarray(Image.fromarray(b).resize((8, 8), Image.Resampling.BILINEAR)) for b in base])
        cells = png_cells(images, str(s))
        if s % 10 == 0 and m > 7:
            cells[7] = {"bytes": b"\x89PNG corrupt", "path": "bad.png"}
            bad += 1
        write_hf_parquet(root / f"part-{s:05d}.parquet", cells, rng.integers(0, 10, m), row_group_size=row_group)
    return bad


def checkpoint(path: Path) -> None:
    from nrm.fit import fit

    torch.manual_seed(0)
    model = nrm.NRM(nrm.preset("digits8")).eval().requires_grad_(False)
    x = torch.randn(256, *model.input_shape)
    fit(model, [x], [x])
    nrm.save(model, path)


def check_output(m: dict[str, Any], fs: pafs.FileSystem | None, expected_ids: int) -> dict[str, Any]:
    """Read the committed output back: the accounting the manifest claims, and ids unique and complete."""
    def path(uri: str) -> str:
        return uri[len("s3://"):] if uri.startswith("s3://") else uri

    t = pa.concat_tables([pq.read_table(path(o["uri"]), filesystem=fs, columns=["id", "status"])
                          for o in manifest.outputs(Store(), m)])
    ids = t["id"].to_pylist()
    ok = int(pa.compute.sum(pa.compute.equal(t["status"], "ok")).as_py() or 0)
    return {"rows_read": t.num_rows, "ok_read": ok, "error_read": t.num_rows - ok,
            "duplicates": len(ids) - len(set(ids)), "missing": expected_ids - len(set(ids)),
            "accounting_holds": t.num_rows == m["rows"]["in"] == m["rows"]["ok"] + m["rows"]["error"]}


def run_job(label: str, model: str, data: str, out: str, batch: int, rows: int, fs: pafs.FileSystem | None
            ) -> dict[str, Any]:
    t = time.perf_counter()
    with PeakRSS() as mem:
        r = run_score(ScoreOptions(model=model, input=data, output=out, run_id=f"soak-{label}", batch_size=batch),
                      echo=print)
    wall = time.perf_counter() - t
    m = r.manifest
    rec = {"run": label, "status": r.status, "rows_in": m["rows"]["in"], "ok": m["rows"]["ok"],
           "error": m["rows"]["error"], "failed_inputs": m["input_files"]["failed"], "inputs": m["inputs"]["count"],
           "outputs": m["outputs"]["count"], "job_seconds": m["timings"]["seconds"], "wall_seconds": round(wall, 1),
           "images_per_s": m["timings"]["images_per_s"], "peak_rss_mib": round(mem.peak / 2**20),
           **check_output(m, fs, rows)}
    print(json.dumps(rec))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--row-group", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--skip-s3", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="nrm-soak-") as tmp:
        root = Path(tmp)
        checkpoint(root / "ckpt")
        t = time.perf_counter()
        bad = write_shards(root / "data", args.rows, args.shards, args.row_group)
        print(f"generated {args.rows} images in {args.shards} shards ({bad} corrupt) in {time.perf_counter() - t:.0f} s")
        moto = None if args.skip_s3 else start_moto(root / "moto.log")
        if moto is not None:  # before Ray starts, so its workers inherit the endpoint
            os.environ.update(AWS_ENDPOINT_URL=moto[1], AWS_ACCESS_KEY_ID="soak", AWS_SECRET_ACCESS_KEY="soak",
                              AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        init_ray(None)
        try:
            results.append(run_job("local", str(root / "ckpt"), str(root / "data"), str(root / "out"),
                                   args.batch_size, args.rows, None))
            if moto is not None:
                s3 = Store().s3()
                s3.create_bucket(Bucket="nrm-soak")
                for f in sorted((root / "data").glob("*.parquet")):
                    s3.upload_file(str(f), "nrm-soak", f"data/{f.name}")
                for f in sorted((root / "ckpt").iterdir()):
                    s3.upload_file(str(f), "nrm-soak", f"model/{f.name}")
                before = request_counts(root / "moto.log")
                fs = pafs.S3FileSystem(endpoint_override=moto[1].split("://", 1)[1], scheme="http", region="us-east-1")
                rec = run_job("s3", "s3://nrm-soak/model", "s3://nrm-soak/data", "s3://nrm-soak/out",
                              args.batch_size, args.rows, fs)
                after = request_counts(root / "moto.log")
                rec["s3_requests"] = sum(after.values()) - sum(before.values())
                results.append(rec)
        finally:
            if moto is not None:
                moto[0].terminate()
    print()
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v is not False]
    print("command: `nice .venv/bin/python scripts/soak.py " + " ".join(flags) + "`")
    print()
    print("| run | status | rows in | ok | error | read back | duplicates | missing | images/s | job s | peak RSS MiB "
          "| S3 requests |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['status']} | {r['rows_in']} | {r['ok']} | {r['error']} | {r['rows_read']} | "
              f"{r['duplicates']} | {r['missing']} | {r['images_per_s']} | {r['job_seconds']} | {r['peak_rss_mib']} "
              f"| {r.get('s3_requests', '-')} |")


if __name__ == "__main__":
    main()
