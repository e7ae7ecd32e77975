"""Sections 3-5 of `nrm-ood bench`: the end-to-end job (local files and the S3 endpoint) against
in-memory scoring, read + decode throughput, and peak memory at 1x and 10x the dataset."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nrm
from jobs.bench.timing import Echo, best_time, random_model
from nrm.fit import fit


def write_shards(root: Path, n: int, shards: int, shape: tuple[int, int, int]) -> None:
    from PIL import Image

    from jobs.datasets import png_cells, write_hf_parquet

    c, h, w = shape
    rng = np.random.default_rng(0)
    per = (n + shards - 1) // shards
    for s in range(shards):
        m = min(per, n - s * per)
        if m <= 0:
            break
        # smooth random images (closer to real PNG sizes than white noise)
        base = rng.integers(0, 256, (m, h // 4 + 1, w // 4 + 1, c), dtype=np.uint8)
        images = np.stack([np.asarray(Image.fromarray(b.squeeze(-1) if c == 1 else b).resize(
            (w, h), Image.Resampling.BILINEAR)) for b in base])
        write_hf_parquet(root / f"part-{s:05d}.parquet", png_cells(images, str(s)),
                         rng.integers(0, 10, m), row_group_size=1024)


class PeakRSS:
    """Peak resident memory of this process and all its descendants (Ray's raylet and workers)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(Exception):
                total += p.memory_info().rss
        return total

    def __enter__(self) -> PeakRSS:
        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._sample())
                time.sleep(0.2)

        self.t = threading.Thread(target=loop, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.t.join()


def request_counts(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            if f'"{method} ' in line:
                counts[method] = counts.get(method, 0) + 1
    return counts


def decode_throughput(data: Path, shape: tuple[int, int, int]) -> float:
    """Images/s of Parquet read + PNG decode in this one process (one CPU), as a read task does it."""
    from jobs.images import Policy
    from jobs.pipeline import ReadSpec, read_unit
    from jobs.planning import plan_inputs
    from jobs.storage import Store

    store = Store()
    plan = plan_inputs(store, store.list_parquet(str(data))[:2], None, None, None)
    spec = ReadSpec(store, shape, Policy.adapt)
    t = time.perf_counter()
    n = sum(len(read_unit(u, spec)["id"]) for u in plan.units)
    return n / (time.perf_counter() - t)


def in_memory_throughput(ckpt: Path, data: Path, threads: int, batch: int) -> float:
    """Images/s of model.score on already decoded, preprocessed tensors (no I/O, no Ray), in the
    layout the scoring actors use (the Runner's fast layout: channels_last on a CPU)."""
    from jobs.datasets import load_labelled
    from nrm.runner import Runner

    runner = Runner(nrm.load(ckpt))
    model = runner.model
    x, _ = load_labelled(str(data), model.input_shape, limit=8192)
    xs = model.preprocess(torch.from_numpy(x))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def run() -> None:
            for i in range(0, len(xs), batch):
                runner.score(xs[i : i + batch])

        return len(xs) / best_time(run, 3)
    finally:
        torch.set_num_threads(old)


def job(ckpt: str, data: str, out: str, batch: int, echo: Echo) -> tuple[dict[str, Any], float]:
    from jobs.pipeline import ScoreOptions, run_score

    with PeakRSS() as mem:
        res = run_score(ScoreOptions(model=ckpt, input=data, output=out, batch_size=batch), echo=lambda s: None)
    m = res.manifest
    assert m["rows"]["in"] == m["rows"]["ok"] + m["rows"]["error"]
    echo(f"  job {data}: {m['rows']['in']} rows, {m['timings']['images_per_s']} images/s, peak RSS {mem.peak / 2**20:.0f} MiB")
    return m, mem.peak


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """moto's S3 server on 127.0.0.1; its request log (one line per HTTP request) goes to ``log``."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    return None


@dataclass
class JobRuns:
    """What sections 3-5 report: the throughputs measured and the job runs' manifests and peak memory."""

    cpus: float
    mem_1t: float  # in-memory images/s, one torch thread (what one actor gets here)
    mem_all: float  # in-memory images/s, every core
    decode: float  # read + decode images/s per CPU
    m1: dict[str, Any]
    peak1: float
    m10: dict[str, Any]
    peak10: float
    s3: dict[str, Any] | None = None  # the S3 run's manifest; None when moto's server is not installed
    requests: dict[str, int] = field(default_factory=dict)  # its HTTP requests by method


def job_sections(n: int, batch: int, echo: Echo) -> list[str]:
    """End-to-end job throughput (local and S3), read + decode throughput, peak memory at 1x and 10x."""
    from jobs.pipeline import init_ray

    init_ray(None)
    with tempfile.TemporaryDirectory(prefix="nrm-bench-") as tmp:
        runs = measure_jobs(Path(tmp), n, batch, echo)
    return [*throughput_section(runs, batch), *decode_section(runs), *memory_section(runs)]


def measure_jobs(root: Path, n: int, batch: int, echo: Echo) -> JobRuns:
    """Write the generated datasets and a gray28 checkpoint under ``root``; measure in-memory and
    decode throughput, then the job on 1x and 10x the dataset and through the S3 endpoint."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    ckpt = root / "ckpt"
    model = random_model(nrm.preset("gray28", 0.5))
    xs = torch.randn(256, *model.input_shape)
    fit(model, [xs], [xs])
    nrm.save(model, ckpt)
    echo(f"writing {n} and {10 * n} generated 28x28 PNG images ...")
    write_shards(root / "data1x", n, 8, model.input_shape)
    write_shards(root / "data10x", 10 * n, 40, model.input_shape)
    threads = 1  # what each actor gets on this machine (cpus_per_actor 1)
    mem_1t = in_memory_throughput(ckpt, root / "data1x", threads, batch)
    mem_all = in_memory_throughput(ckpt, root / "data1x", max(1, int(cpus)), batch)
    echo(f"  in-memory: {mem_1t:.0f} images/s (1 thread), {mem_all:.0f} (all cores)")
    decode = decode_throughput(root / "data1x", model.input_shape)
    echo(f"  read + decode: {decode:.0f} images/s per CPU")
    echo("end-to-end job, local files ...")
    m1, peak1 = job(str(ckpt), str(root / "data1x"), str(root / "out"), batch, echo)
    m10, peak10 = job(str(ckpt), str(root / "data10x"), str(root / "out"), batch, echo)
    runs = JobRuns(cpus, mem_1t, mem_all, decode, m1, peak1, m10, peak10)
    runs.s3, runs.requests = s3_job(root, ckpt, batch, echo)
    return runs


@contextlib.contextmanager
def s3_environment(url: str) -> Iterator[None]:
    """The AWS variables that point boto3, pyarrow and Ray's workers at ``url``, restored on exit."""
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_job(root: Path, ckpt: Path, batch: int, echo: Echo) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """The 1x job through moto's S3 server on 127.0.0.1: its manifest and its HTTP requests by method
    (None and {} when moto's server is not installed)."""
    import ray

    from jobs.pipeline import init_ray
    from jobs.storage import Store

    moto = start_moto(root / "moto.log")
    if moto is None:
        return None, {}
    echo("   ... and through the S3 endpoint (moto server on 127.0.0.1)")
    proc, url = moto
    try:
        with s3_environment(url):
            s3c = Store().s3()
            s3c.create_bucket(Bucket="nrm-bench")
            for f in sorted((root / "data1x").glob("*.parquet")):
                s3c.upload_file(str(f), "nrm-bench", f"data/{f.name}")
            for f in sorted(ckpt.iterdir()):
                s3c.upload_file(str(f), "nrm-bench", f"model/{f.name}")
            ray.shutdown()  # workers must see the endpoint variables
            init_ray(None)
            before = request_counts(root / "moto.log")
            m, _ = job("s3://nrm-bench/model", "s3://nrm-bench/data", "s3://nrm-bench/out", batch, echo)
            after = request_counts(root / "moto.log")
    finally:
        proc.terminate()
    return m, {k: after.get(k, 0) - before.get(k, 0) for k in after}


def throughput_section(runs: JobRuns, batch: int) -> list[str]:
    lines = ["", "## 3. End-to-end job throughput / in-memory scoring throughput (target >= 0.8)", "",
             f"Generated 28x28 grayscale PNG shards (HF image layout), gray28 w0.5 checkpoint, batch {batch}, "
             f"embedded Ray with {runs.cpus:g} CPUs: 1 scoring actor x 1 CPU (torch threads 1) + read/decode tasks "
             "at 0.5 CPU. Job time includes planning, Ray start-up of the pipeline, decode, score, Parquet write "
             "and the manifest.", "",
             f"In-memory `model.score` on preprocessed tensors: **{runs.mem_1t:.0f} images/s with 1 thread** "
             f"(what one actor gets here), {runs.mem_all:.0f} images/s with {int(runs.cpus)} threads.", "",
             "| input | rows | job images/s | / in-memory (1 thread) | / in-memory (all cores) | target met |",
             "|---|---|---|---|---|---|"]
    for label, m in (("local 1x", runs.m1), ("local 10x", runs.m10), ("S3 (moto) 1x", runs.s3)):
        if m is None:
            lines.append(f"| {label} | - | not measured (moto server not installed) | | | |")
            continue
        ips = m["timings"]["images_per_s"]
        lines.append(f"| {label} | {m['rows']['in']} | {ips:.0f} | {ips / runs.mem_1t:.2f} | {ips / runs.mem_all:.2f} | "
                     f"{'yes' if ips / runs.mem_1t >= 0.8 else 'no'} |")
    if runs.s3 is not None:
        shards = runs.s3["inputs"]["count"]
        total = sum(runs.requests.values())
        lines += ["", f"S3 requests of that run (moto's request log): {total} in all for {shards} input shards of "
                  f"{runs.s3['rows']['in'] // max(1, shards)} rows and {runs.s3['outputs']['count']} output files: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(runs.requests.items()))
                  + f" (~{total / max(1, shards):.1f} requests per input shard, everything included)."]
    return lines


def decode_section(runs: JobRuns) -> list[str]:
    return ["", "## 4. Read + decode throughput per CPU", "",
            f"Parquet row groups read and PNG-decoded by `read_unit` in one process: **{runs.decode:.0f} images/s per "
            "CPU** (28x28 grayscale)."]


def memory_section(runs: JobRuns) -> list[str]:
    growth = runs.peak10 / runs.peak1 - 1
    return ["", "## 5. Peak memory at 1x and 10x the dataset (target: flat within 20%)", "",
            "Peak RSS of the driver and every Ray process it started (raylet, GCS, workers), sampled every 0.2 s.", "",
            "| dataset | rows | peak RSS (MiB) |", "|---|---|---|",
            f"| 1x | {runs.m1['rows']['in']} | {runs.peak1 / 2**20:.0f} |",
            f"| 10x | {runs.m10['rows']['in']} | {runs.peak10 / 2**20:.0f} |", "",
            f"Growth 1x -> 10x: {growth:+.1%} ({'met' if abs(growth) <= 0.2 else 'not met'}).", ""]
