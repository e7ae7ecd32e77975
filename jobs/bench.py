"""`nrm-ood bench`: the speed and memory targets, measured side by side in one run.

1. NRM scoring time / plain inference time of the same CNN and batch (target <= 2.0x);
2. end-to-end job throughput (Parquet -> scores, local files and the S3 endpoint) / in-memory
   scoring throughput of the same model with the same torch threads as the job's actors (>= 0.8);
3. peak memory (driver + Ray processes, RSS sampled every 0.2 s) at 1x and 10x the dataset (flat within 20%);
4. images/s on a GPU when torch sees one.
Writes a markdown report (docs/benchmarks.md by default) with the command and the machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nrm
from nrm.config import ModelConfig
from nrm.detectors import DEFAULT_DETECTOR, DEFAULT_FEATURES, refit

Echo = Callable[[str], None]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def _time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def random_model(cfg: ModelConfig, device: str = "cpu") -> nrm.NRM:
    torch.manual_seed(0)
    return nrm.NRM(cfg).to(device).eval().requires_grad_(False)


def overhead(cfg: ModelConfig, batch: int, reps: int, device: str = "cpu") -> dict[str, float]:
    model = random_model(cfg, device)
    x = torch.randn(batch, *model.input_shape, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def plain() -> None:
        with torch.no_grad():
            model(x)
        sync()

    def scored() -> None:
        model.score(x)
        sync()

    tp, ts = _time(plain, reps), _time(scored, reps)
    # the same with nrm-ood train's default detector fitted (on random inputs: only its cost matters)
    refit(model, [torch.randn(256, *model.input_shape, device=device) for _ in range(2)])
    td = _time(scored, reps)
    return {"plain_s": tp, "score_s": ts, "ratio": ts / tp, "images_per_s": batch / ts, "detector_s": td,
            "detector_ratio": td / tp}


def _write_shards(root: Path, n: int, shards: int, shape: tuple[int, int, int]) -> None:
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
    from jobs.pipeline import ReadSpec, plan_inputs, read_unit
    from jobs.storage import Store

    store = Store()
    plan = plan_inputs(store, store.list_parquet(str(data))[:2], None, None, None)
    spec = ReadSpec(store, shape, Policy.adapt)
    t = time.perf_counter()
    n = sum(len(read_unit(vars(u), spec)["id"]) for u in plan.units)
    return n / (time.perf_counter() - t)


def in_memory_throughput(ckpt: Path, data: Path, threads: int, batch: int) -> float:
    """Images/s of model.score on already decoded, preprocessed tensors (no I/O, no Ray)."""
    from jobs.datasets import load_labelled

    model = nrm.load(ckpt)
    x, _ = load_labelled(str(data), model.input_shape, limit=8192)
    xs = model.preprocess(torch.from_numpy(x))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def run() -> None:
            for i in range(0, len(xs), batch):
                model.score(xs[i : i + batch])

        return len(xs) / _time(run, 3)
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


def run(out_md: Path, n: int, batch: int, reps: int, echo: Echo, command: str) -> str:
    from jobs.pipeline import init_ray

    lines = ["# Benchmarks", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Machine: {machine()}.", ""]
    # 1. overhead ---------------------------------------------------------------------------
    echo("1/4 NRM scoring vs plain inference ...")
    lines += ["## 1. NRM scoring time / plain inference time (target <= 2.0x)", "",
              "Same random-initialised CNN, same batch; plain = `model(x)` under no_grad; NRM = `model.score(x)` "
              "(forward + one vector-Jacobian product + score columns). Median of "
              f"{reps} runs after a warm-up; torch threads {torch.get_num_threads()}. The last two columns: "
              f"the same with `nrm-ood train`'s default detector fitted ({DEFAULT_DETECTOR}[{DEFAULT_FEATURES}]).", "",
              "| model | input | batch | plain (ms) | NRM score (ms) | ratio | NRM images/s | target met "
              "| + detector (ms) | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, width in (("gray28", 0.5), ("gray28", 1.0), ("rgb32-small", 1.0), ("rgb32-allconv", 0.5)):
            cfg = nrm.preset(name, width)
            b = batch if device == "cpu" else 1024
            r = overhead(cfg, b, reps, device)
            lines.append(f"| {name} w{width} ({device}) | {'x'.join(map(str, cfg.input.shape))} | {b} | "
                         f"{r['plain_s'] * 1e3:.1f} | {r['score_s'] * 1e3:.1f} | {r['ratio']:.2f}x | "
                         f"{r['images_per_s']:.0f} | {'yes' if r['ratio'] <= 2.0 else 'no'} | "
                         f"{r['detector_s'] * 1e3:.1f} | {r['detector_ratio']:.2f}x |")
            echo(f"  {name} w{width} {device}: {r['ratio']:.2f}x")
    if not torch.cuda.is_available():
        lines += ["", "No GPU on this machine: GPU images/s are not measured here (see docs/scaling.md)."]
    # 2./3. end to end ----------------------------------------------------------------------
    init_ray(None)
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    with tempfile.TemporaryDirectory(prefix="nrm-bench-") as tmp:
        root = Path(tmp)
        ckpt = root / "ckpt"
        model = random_model(nrm.preset("gray28", 0.5))
        from nrm.fit import fit

        xs = torch.randn(256, *model.input_shape)
        fit(model, [xs], [xs])
        nrm.save(model, ckpt)
        echo(f"2/4 writing {n} and {10 * n} generated 28x28 PNG images ...")
        _write_shards(root / "data1x", n, 8, model.input_shape)
        _write_shards(root / "data10x", 10 * n, 40, model.input_shape)
        threads = 1  # what each actor gets on this machine (cpus_per_actor 1)
        mem_1t = in_memory_throughput(ckpt, root / "data1x", threads, batch)
        mem_all = in_memory_throughput(ckpt, root / "data1x", max(1, int(cpus)), batch)
        echo(f"  in-memory: {mem_1t:.0f} images/s (1 thread), {mem_all:.0f} (all cores)")
        decode = decode_throughput(root / "data1x", model.input_shape)
        echo(f"  read + decode: {decode:.0f} images/s per CPU")
        echo("3/4 end-to-end job, local files ...")
        m1, peak1 = job(str(ckpt), str(root / "data1x"), str(root / "out"), batch, echo)
        m10, peak10 = job(str(ckpt), str(root / "data10x"), str(root / "out"), batch, echo)
        s3, requests = None, {}
        moto = start_moto(root / "moto.log")
        if moto is not None:
            echo("   ... and through the S3 endpoint (moto server on 127.0.0.1)")
            proc, url = moto
            saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
            os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
            try:
                from jobs.storage import Store

                s3c = Store().s3()
                s3c.create_bucket(Bucket="nrm-bench")
                for f in sorted((root / "data1x").glob("*.parquet")):
                    s3c.upload_file(str(f), "nrm-bench", f"data/{f.name}")
                for f in sorted(ckpt.iterdir()):
                    s3c.upload_file(str(f), "nrm-bench", f"model/{f.name}")
                ray.shutdown()  # workers must see the endpoint variables
                init_ray(None)
                before = request_counts(root / "moto.log")
                s3, _ = job("s3://nrm-bench/model", "s3://nrm-bench/data", "s3://nrm-bench/out", batch, echo)
                after = request_counts(root / "moto.log")
                requests = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                proc.terminate()
    lines += ["", "## 2. End-to-end job throughput / in-memory scoring throughput (target >= 0.8)", "",
              f"Generated 28x28 grayscale PNG shards (HF image layout), gray28 w0.5 checkpoint, batch {batch}, "
              f"embedded Ray with {cpus:g} CPUs: 1 scoring actor x 1 CPU (torch threads 1) + read/decode tasks at 0.5 CPU. "
              "Job time includes planning, Ray start-up of the pipeline, decode, score, Parquet write and the manifest.", "",
              f"In-memory `model.score` on preprocessed tensors: **{mem_1t:.0f} images/s with 1 thread** "
              f"(what one actor gets here), {mem_all:.0f} images/s with {int(cpus)} threads.", "",
              "| input | rows | job images/s | / in-memory (1 thread) | / in-memory (all cores) | target met |",
              "|---|---|---|---|---|---|"]
    for label, m in (("local 1x", m1), ("local 10x", m10), ("S3 (moto) 1x", s3)):
        if m is None:
            lines.append(f"| {label} | - | not measured (moto server not installed) | | | |")
            continue
        ips = m["timings"]["images_per_s"]
        lines.append(f"| {label} | {m['rows']['in']} | {ips:.0f} | {ips / mem_1t:.2f} | {ips / mem_all:.2f} | "
                     f"{'yes' if ips / mem_1t >= 0.8 else 'no'} |")
    if s3 is not None:
        shards = s3["inputs"]["count"]
        total = sum(requests.values())
        lines += ["", f"S3 requests of that run (moto's request log): {total} in all for {shards} input shards of "
                  f"{s3['rows']['in'] // max(1, shards)} rows and {s3['outputs']['count']} output files: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(requests.items()))
                  + f" (~{total / max(1, shards):.1f} requests per input shard, everything included)."]
    lines += ["", "## 3. Read + decode throughput per CPU", "",
              f"Parquet row groups read and PNG-decoded by `read_unit` in one process: **{decode:.0f} images/s per CPU** "
              "(28x28 grayscale)."]
    growth = peak10 / peak1 - 1
    lines += ["", "## 4. Peak memory at 1x and 10x the dataset (target: flat within 20%)", "",
              "Peak RSS of the driver and every Ray process it started (raylet, GCS, workers), sampled every 0.2 s.", "",
              "| dataset | rows | peak RSS (MiB) |", "|---|---|---|",
              f"| 1x | {m1['rows']['in']} | {peak1 / 2**20:.0f} |",
              f"| 10x | {m10['rows']['in']} | {peak10 / 2**20:.0f} |", "",
              f"Growth 1x -> 10x: {growth:+.1%} ({'met' if abs(growth) <= 0.2 else 'not met'}).", ""]
    text = "\n".join(lines) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    return text
