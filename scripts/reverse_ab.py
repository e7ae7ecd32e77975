"""The whole default table, its top-down pass taken two ways, interleaved (docs/benchmarks.md section
7): through autograd (``NRM.autograd_pass``) and as the in-place reverse pass (``NRM.full_pass``,
what scoring runs), against plain inference in channels_last.

    python scripts/reverse_ab.py [--reps N] [--shared DIR] [LABEL ...]   # LABEL: part of a bench model's name

Each model: the default detector and baselines fitted for cost as the bench does, then plain, autograd
and reverse timed in turn ``reps`` times (so drift in this VM's speed hits all three alike), best of
each. Prints ms and the ratios to plain."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.allocator import keep_freed_memory  # noqa: E402
from jobs.bench.speed import bench_models, fit_for_cost, full_table  # noqa: E402
from jobs.bench.timing import plain_variants  # noqa: E402
from nrm import NRM  # noqa: E402
from nrm.runner import Runner  # noqa: E402


def measure(label: str, model: NRM, plain: torch.nn.Module, reps: int) -> None:
    x = torch.randn(512, *model.input_shape)
    fit_for_cost(model)
    runner = Runner(model, layout="channels_last")
    plan = model.plan(full_table(model), flag=False)
    variants = plain_variants(plain, x, lambda: None, runner.autocast)
    run_plain = variants.get("BN fused, channels_last", variants["as given, channels_last"])

    def autograd() -> None:  # the same table, its top-down pass one vector-Jacobian product
        with torch.no_grad(), runner.autocast():
            p = model.autograd_pass(runner.to_layout(x), stats=plan.unit_stats)
        model.tabulate(x, p, plan)

    def reverse() -> None:
        runner.score(x, plan)

    runs = {"plain": run_plain, "autograd": autograd, "reverse": reverse}
    best = dict.fromkeys(runs, float("inf"))
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    p, a, r = (best[k] * 1e3 for k in runs)
    print(f"{label}: plain {p:.1f} ms, through autograd {a:.1f} ms ({a / p:.2f}x), in-place reverse {r:.1f} ms "
          f"({r / p:.2f}x): {100 * (1 - r / a):.0f}% less time", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labels", nargs="*", help="bench models whose name contains one of these (default: all)")
    ap.add_argument("--reps", type=int, default=6, help="rounds of the three timings (default 6)")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared",
                    help="the shared folder with models/cifar10-resnet (default: ../shared beside the repository)")
    a = ap.parse_args()
    keep_freed_memory()  # as the CLI and the scoring actors do (jobs/allocator.py)
    for m in bench_models("cpu", a.shared if a.shared.is_dir() else None, tuple(a.labels)):
        measure(*m, a.reps)
