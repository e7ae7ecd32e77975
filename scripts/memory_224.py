"""Peak memory per image at 224 px on a CPU: torchvision's ResNet-18 and ResNet-50 (random weights,
converted with nrm.from_torch), full NRM score, its forward-only columns and plain inference.

    PYTHONPATH=. python scripts/memory_224.py [--batches 8,16,32,64] [--models resnet18,resnet50]

Per model and batch, three ways of scoring a fresh random batch (its input allocated inside the
measurement):
- full score: ``Runner(model).score(x)``, every column of the NRM's table (no detector is fitted: the
  default one, mahalanobis on gate statistics, would hold a covariance over ResNet-50's 45,000 gate
  and activation features, 16 GB in float64, which no 24 GiB machine shared with others fits);
- forward-only: ``Runner(model).score(x, model.plan(CLASSIFIER, flag=False))`` (pred, max_softmax,
  max_logit, energy), no backward pass;
- plain: the torchvision module itself, BatchNorm fused, channels-last, under no_grad.
Each is measured two ways: tensor bytes (nrm.batching.peak_bytes_of: the profiler's allocation records,
what --batch-size auto probes) and the process's resident-set growth (VmHWM after, with the high-water
mark reset just before, minus VmRSS before), with glibc told to return every freed block of 64 KiB or
more at once, so that the resident set follows the live memory. Memory does not depend on the load of
the machine; timings do, and none are taken. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import platform
import sys
from collections.abc import Callable

import torch

import nrm
from jobs.bench.speed import CLASSIFIER
from nrm.batching import peak_bytes_of
from nrm.plan import ScorePlan
from nrm.runner import Runner

SHAPE = (3, 224, 224)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_models() -> object:
    """torchvision.models, through jobs.torchvision_compat where this checkout has it."""
    try:
        from jobs.torchvision_compat import import_module  # type: ignore[import-not-found]

        return import_module("torchvision.models")
    except ImportError:
        import types

        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules.setdefault(name, types.ModuleType(name))
        import torchvision.models

        return torchvision.models


def return_freed_memory() -> None:
    """glibc: serve blocks of 64 KiB and more by mmap (no dynamic threshold) and trim the heap at once."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def measure(fn: Callable[[], object]) -> tuple[int, int]:
    """(tensor peak bytes, resident-set growth bytes) of fn()."""
    fn()  # warm-up: oneDNN's kernels and caches are made once
    rss = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    tensors = peak_bytes_of(fn, torch.device("cpu"))
    return tensors, (status_kib("VmHWM") - rss) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--models", default="resnet18,resnet50")
    args = ap.parse_args()
    return_freed_memory()
    torch.set_num_threads(2)
    models = torchvision_models()
    from torch.fx.experimental.optimization import fuse

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}", file=sys.stderr)
    print("| model | batch | full score MiB/image (tensors / RSS) | forward-only MiB/image (tensors / RSS) | "
          "plain MiB/image (tensors / RSS) |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        module = getattr(models, name)().eval()
        model = nrm.from_torch(module, SHAPE, mean=MEAN, std=STD)
        runner = Runner(model)
        plain = fuse(copy.deepcopy(module)).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        plans = {"full": model.plan(), "forward": model.plan(CLASSIFIER, flag=False)}
        for n in map(int, args.batches.split(",")):
            print(f"| {name} | {n} | " + " | ".join(per_image(runner, plans, plain, n)) + " |", flush=True)


def per_image(runner: Runner, plans: dict[str, ScorePlan], plain: torch.nn.Module, n: int) -> list[str]:
    """The table's cells for batch n: MiB per image, tensors / RSS, of the full score, forward-only, plain."""

    def x() -> torch.Tensor:
        return torch.randn(n, *SHAPE).contiguous(memory_format=torch.channels_last)

    def plain_run() -> None:
        with torch.no_grad():
            plain(x())

    cells = []
    for fn in (lambda: runner.score(x(), plans["full"]), lambda: runner.score(x(), plans["forward"]), plain_run):
        t, r = measure(fn)
        cells.append(f"{t / n / 2**20:.1f} / {r / n / 2**20:.1f}")
    return cells

if __name__ == "__main__":
    main()
