"""`nrm-ood bench`: the speed and memory targets, measured side by side in one run.

Sections (``SECTIONS``, each a module):

* ``speed`` (jobs/bench/speed.py): NRM scoring time / plain inference time of the same network and
  batch (targets <= 2.0x full score, <= 1.15x forward-only columns), on every device asked for;
* ``compile`` (jobs/bench/speed.py): the same with torch.compile;
* ``precision`` (jobs/bench/precision.py): the full score per precision, and the AUROC change;
* ``job`` (jobs/bench/job.py): end-to-end job throughput (local files and the S3 endpoint) / in-memory
  scoring throughput (>= 0.8), read + decode throughput, and peak memory at 1x and 10x the dataset
  (flat within 20%).

``run`` writes them into one markdown report with the command and the machine; jobs/bench/timing.py
holds the timing helpers. Importing this package imports no torch (``nrm-ood --help`` lists the
sections); ``run`` imports the sections it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

SECTIONS = ("speed", "compile", "precision", "job")


def run(out_md: Path | None, n: int, batch: int, reps: int, echo: Callable[[str], None], command: str,
        sections: tuple[str, ...] = SECTIONS, shared: Path | None = None, devices: tuple[str, ...] = (),
        only: tuple[str, ...] = ()) -> str:
    """Run the chosen ``sections`` and return the markdown report; write it to ``out_md`` when given.
    ``devices``: where section 1 runs (default: the CPU, and the GPU when torch sees one); the compile
    and precision sections run on the last of them. ``only``: the models of sections 1 and 1b whose
    label contains one of these strings (all when empty)."""
    import torch

    from jobs.allocator import keep_freed_memory
    from jobs.bench.timing import machine

    kept = keep_freed_memory()  # as the CLI and the scoring actors run: plain and NRM alike
    lines = ["# Benchmarks", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Machine: {machine()}. Freed memory {'kept in the process' if kept else 'returned to the system'} "
             "(jobs/allocator.py).", ""]
    devices = devices or ("cpu", *(["cuda"] if torch.cuda.is_available() else []))
    if "speed" in sections:
        from jobs.bench.speed import speed_section

        echo("NRM scoring vs plain inference ...")
        lines += speed_section(list(devices), batch, reps, shared, echo, only) + [""]
    if "compile" in sections:
        from jobs.bench.speed import compile_section

        echo("NRM scoring vs plain inference, compiled ...")
        lines += compile_section(devices[-1], batch, reps, shared, echo, only) + [""]
    if "precision" in sections:
        from jobs.bench.precision import precision_section

        echo("reduced precision ...")
        lines += precision_section(devices[-1], batch, reps, shared, echo) + [""]
    if "job" in sections:
        from jobs.bench.job import job_sections

        lines += job_sections(n, batch, echo)
    text = "\n".join(lines) + "\n"
    if out_md is not None:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(text)
    return text
