"""Where the forward-only columns spend their time (docs/benchmarks.md section 7).

    python scripts/profile_score.py [MODEL_INDEX]     # index into jobs.bench.speed.bench_models; 5 = ResNet-56

Times the NRM forward and the forward-only columns of one bench model (batch 512, channels_last,
the default detector fitted for cost as the bench does), then prints torch.profiler's table of one
forward-only call."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.allocator import keep_freed_memory  # noqa: E402
from jobs.bench.speed import FORWARD_ONLY, bench_models, fit_for_cost  # noqa: E402
from jobs.bench.timing import best_time  # noqa: E402
from nrm.runner import Runner  # noqa: E402


def main(index: int) -> None:
    keep_freed_memory()  # as the CLI and the scoring actors do (jobs/allocator.py)
    shared = Path(__file__).resolve().parents[2] / "shared"
    label, model, _ = bench_models("cpu", shared if shared.is_dir() else None)[index]
    fit_for_cost(model)
    runner = Runner(model, layout="channels_last")
    plan = model.plan(FORWARD_ONLY, flag=False)
    x = torch.randn(512, *model.input_shape)
    with torch.no_grad():
        forward_ms = best_time(lambda: runner(x), 3) * 1e3
    print(f"{label}: NRM forward {forward_ms:.1f} ms, forward-only columns "
          f"{best_time(lambda: runner.score(x, plan), 3) * 1e3:.1f} ms (best of 3)")
    with profile() as p:
        runner.score(x, plan)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
