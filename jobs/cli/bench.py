"""`nrm-ood bench`: measure the speed and memory targets (jobs.bench) and print or write the report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from jobs.bench import SECTIONS
from jobs.cli.options import DEVICES, at_least, choice

app = typer.Typer()


BENCH_DOC = "docs/benchmarks.md"


@app.command()
def bench(
    out: Annotated[Path | None, typer.Option(help="Also write the report to this markdown file; by default it is only printed.")] = None,
    write_docs: Annotated[bool, typer.Option(help=f"Write the tracked {BENCH_DOC} (instead of --out).")] = False,
    rows: Annotated[int, at_least(1, "Images in the job's 1x dataset (10x is also run).")] = 20000,
    batch_size: Annotated[int, at_least(1, "CPU batch size (a GPU runs 512 and 4096).")] = 512,
    reps: Annotated[int, at_least(1, "Timed repetitions per measurement.")] = 5,
    section: Annotated[list[str] | None, choice(SECTIONS, "Run only these sections (repeatable): speed (NRM/plain ratios), compile (the same with torch.compile; compiles take minutes), precision, job (end to end, memory). Default: all.")] = None,
    shared: Annotated[Path | None, typer.Option(help="The shared folder with models/cifar10-resnet and datasets/ (default ../shared when it exists): the pretrained ResNets and the precision AUROC.")] = None,
    device: Annotated[list[str] | None, choice(DEVICES, "Measure on these devices (repeatable; the compile and precision sections use the last). Default: cpu, and cuda when torch sees a GPU.")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Sections speed and compile: only the models whose label contains this text, e.g. ResNet (repeatable). Default: every preset and ResNet.")] = None,
) -> None:
    """Measure the speed and memory targets; print the report (write it with --out, or --write-docs)."""
    import torch

    from jobs.bench import run

    out = Path(BENCH_DOC) if write_docs else out
    command = "nrm-ood bench " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else "nrm-ood bench"
    if shared is None and Path("../shared").is_dir():
        shared = Path("../shared")
    sections = tuple(section) if section else SECTIONS
    devices = tuple(device or ())
    if "cuda" in devices and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda was asked for, but torch sees no CUDA GPU here; "
                                 "leave --device out or run on a machine with one", param_hint="--device")
    text = run(out, rows, batch_size, reps, typer.echo, command.strip(), sections, shared, devices, tuple(only or ()))
    typer.echo(text)
    if out is not None:
        typer.echo(f"wrote {out}")
