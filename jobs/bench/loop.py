"""Section 3a of `nrm-ood bench`: the job against the loop a user would write without Ray, and against
the in-memory scorer, on the same machine in one run; with the job's stage breakdown.

The loop: pyarrow reads each file, PIL decodes, the model scores batches of 512 through a Runner,
one Parquet file is written. The input: MNIST's PNG rows (../shared/datasets/mnist, its shards
repeated to reach ``rows``; generated 28x28 PNGs where it is absent), scored by a small CNN of the
user's converted with ``nrm.from_torch``.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nrm
from jobs.bench.timing import Echo

CLASSIFIER = ("pred", "max_softmax", "max_logit", "energy")  # the forward-only columns of the figure


def user_cnn() -> torch.nn.Module:
    """A user's small MNIST CNN (random weights: the speed does not depend on them)."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10)).eval()


def converted_checkpoint(root: Path, rows: np.ndarray) -> Path:
    """The user's CNN converted and fitted on ``rows`` (uint8 (N, 28, 28, 1)), saved under ``root``."""
    from nrm.fit import fit

    model = nrm.from_torch(user_cnn(), (1, 28, 28), mean=[0.1307], std=[0.3081])
    xs = model.preprocess(torch.from_numpy(rows))
    fit(model, [xs[: len(xs) // 2]], [xs[len(xs) // 2:]])
    nrm.save(model, root / "cnn")
    return root / "cnn"


def mnist_input(root: Path, rows: int, shared: Path | None, echo: Echo) -> Path:
    """A folder of ``rows`` MNIST PNG rows: the shared shards linked (repeated as needed), the last one
    cut to size; generated PNGs where the shared MNIST is absent."""
    import pyarrow.parquet as pq

    out = root / "mnist"
    out.mkdir()
    src = sorted((shared / "datasets" / "mnist" / "train").glob("*.parquet")) if shared else []
    if not src:
        from jobs.bench.job import write_shards

        echo(f"  ../shared/datasets/mnist not found: {rows} generated 28x28 PNG rows instead")
        write_shards(out, rows, max(1, rows // 5000), (1, 28, 28))
        return out
    left, i = rows, 0
    while left > 0:
        f = src[i % len(src)]
        n = pq.ParquetFile(f).metadata.num_rows
        if n <= left:
            os.symlink(f, out / f"part-{i:05d}.parquet")
        else:
            pq.write_table(pq.read_table(f).slice(0, left), out / f"part-{i:05d}.parquet", row_group_size=1024)
        left, i = left - min(n, left), i + 1
    return out


def single_process_loop(ckpt: Path, data: Path, out: Path, columns: tuple[str, ...] | None, batch: int = 512) -> float:
    """Rows/s of the loop a user writes without Ray (read, decode, score, one Parquet file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from nrm.runner import Runner

    t = time.perf_counter()
    runner = Runner(nrm.load(ckpt))
    plan = runner.model.plan(columns)
    tables, n = [], 0
    for f in sorted(data.glob("*.parquet")):
        cells = pq.read_table(f, columns=["image"]).column("image").combine_chunks().field("bytes").to_pylist()
        for i in range(0, len(cells), batch):
            px = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in cells[i : i + batch]])
            cols = runner.score(runner.model.preprocess(torch.from_numpy(px)), plan)
            tables.append(pa.table({k: v.double().numpy() for k, v in cols.items() if v.dim() == 1}))
            n += len(px)
    pq.write_table(pa.concat_tables(tables), out)
    return n / (time.perf_counter() - t)


def in_memory(ckpt: Path, data: Path, columns: tuple[str, ...] | None, batch: int, limit: int = 8192) -> float:
    """Rows/s of the Runner on decoded, preprocessed tensors in memory (every core, no I/O, no Ray)."""
    from jobs.bench.timing import best_time
    from jobs.datasets import load_labelled
    from nrm.runner import Runner

    runner = Runner(nrm.load(ckpt))
    plan = runner.model.plan(columns)
    x, _ = load_labelled(str(data), runner.model.input_shape, limit=limit)
    xs = runner.model.preprocess(torch.from_numpy(x))

    def run() -> None:
        for i in range(0, len(xs), batch):
            runner.score(xs[i : i + batch], plan)

    return len(xs) / best_time(run, 2)


def job_rate(ckpt: Path, data: Path, out: Path, columns: tuple[str, ...] | None, batch: int) -> dict[str, Any]:
    from jobs.pipeline import ScoreOptions, run_score

    res = run_score(ScoreOptions(model=str(ckpt), input=str(data), output=str(out), batch_size=batch,
                                 columns=columns), echo=lambda s: None)
    return res.manifest


def loop_section(root: Path, rows: int, batch: int, shared: Path | None, echo: Echo) -> list[str]:
    """The job vs the single-process loop (full score and classifier columns), the job vs the in-memory
    scorer, and the job's stage breakdown."""
    from jobs.datasets import load_labelled

    echo(f"the job vs the single-process loop, {rows} MNIST rows ...")
    data = mnist_input(root, rows, shared, echo)
    fit_rows, _ = load_labelled(str(data), (1, 28, 28), limit=2048)
    ckpt = converted_checkpoint(root, fit_rows)
    table: list[str] = []
    breakdown: list[str] = []
    for label, cols in (("full score", None), ("classifier columns", CLASSIFIER)):
        loop = single_process_loop(ckpt, data, root / f"loop-{len(table)}.parquet", cols, batch)
        m = job_rate(ckpt, data, root / "out", cols, batch)
        mem = in_memory(ckpt, data, cols, batch)
        job = m["timings"]["images_per_s"]
        echo(f"  {label}: loop {loop:.0f} rows/s, job {job:.0f} rows/s, in-memory {mem:.0f} rows/s")
        table.append(f"| {label} | {loop:,.0f} | {job:,.0f} | **{job / loop:.2f}** | {mem:,.0f} | {job / mem:.2f} |")
        st = m["stages"]
        breakdown.append(f"| {label} | " + " | ".join(f"{st['seconds'][s]:.1f}" for s in st["seconds"])
                         + f" | {st['busy']:.0%} | {st['bound']} |")
    from jobs.stages import STAGES

    return ["", "## 3a. The job against the single-process loop and the in-memory scorer "
            "(targets: job / loop >= 1.2; job / in-memory >= 0.8 where decode is not the bound)", "",
            f"{rows:,} MNIST PNG rows ({'the shared train shards, repeated' if shared else 'generated'}), a small "
            "CNN of the user's converted with `nrm.from_torch`, batch 512. The loop: pyarrow reads each file, PIL "
            "decodes, the Runner scores, one Parquet file is written (jobs/bench/loop.py). The job: `nrm-ood score` "
            "with its defaults on the embedded Ray (planning and the pipeline's start included). In-memory: the "
            "Runner on decoded tensors, every core.", "",
            "| columns | loop rows/s | job rows/s | job / loop | in-memory rows/s | job / in-memory |",
            "|---|---|---|---|---|---|", *table, "",
            "The job's stages (seconds summed over every task and actor; manifest `stages`):", "",
            "| columns | " + " | ".join(STAGES) + " | scorer busy | bound |",
            "|---|" + "---|" * (len(STAGES) + 2), *breakdown]
