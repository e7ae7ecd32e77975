"""The floor of a full NRM score: one forward plus one input vector-Jacobian product of the plain
module, through autograd, against the plain forward (docs/benchmarks.md section 7).

    python scripts/vjp_floor.py [--device cuda] [--batch N] [--profile] [--shared DIR] [MODEL_INDEX ...]
                                 # indices into jobs.bench.speed.bench_models (default: all)

For each bench model: the plain module's forward (no grad, channels_last) and forward + d logit_y*/dx
(autograd, channels_last), best of 5, their ratio, and the NRM's full score (default detector fitted
for cost as the bench does) in the same precision (the NRM's fp32: TF32 off on CUDA). Whatever a full
score costs above the floor is the NRM's own overhead (eta, statistics, detector). Last, the NRM's
bottom-up and top-down passes alone (with the unit statistics), two ways: through autograd
(``NRM.autograd_pass``) and as the in-place reverse pass (``NRM.full_pass``, what scoring runs). --profile prints torch.profiler's table of one full score per model, by device time."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.allocator import keep_freed_memory  # noqa: E402
from jobs.bench.speed import bench_models, fit_for_cost  # noqa: E402
from jobs.bench.timing import best_time, device_sync  # noqa: E402
from nrm import NRM  # noqa: E402
from nrm.runner import Runner  # noqa: E402


def main(indices: list[int], device: str, batch: int, prof: bool, shared: Path) -> None:
    keep_freed_memory()  # as the CLI and the scoring actors do (jobs/allocator.py)
    models = bench_models(device, shared if shared.is_dir() else None)
    for i in indices or range(len(models)):
        measure(*models[i], batch, prof)


def measure(label: str, model: NRM, plain: torch.nn.Module, batch: int, prof: bool) -> None:
    device = model.mean.device.type
    sync = device_sync(device)
    module = copy.deepcopy(plain).to(memory_format=torch.channels_last).requires_grad_(False)
    x = torch.randn(batch, *model.input_shape, device=device).contiguous(memory_format=torch.channels_last)
    fit_for_cost(model)
    runner = Runner(model, layout="channels_last")
    plan = model.plan([c for c in model.columns if c not in ("mahalanobis_feat", "knn", "vim")], flag=False)

    def forward() -> None:
        with torch.no_grad(), runner.autocast():
            module(x)
        sync()

    def forward_vjp() -> None:
        xg = x.detach().requires_grad_(True)
        with runner.autocast():
            logits = module(xg)
            torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xg)
        sync()

    def full() -> None:
        runner.score(x, plan)
        sync()

    def passes_autograd() -> None:
        with torch.no_grad(), runner.autocast():
            model.autograd_pass(x, stats=True)
        sync()

    def passes_reverse() -> None:
        with torch.no_grad(), runner.autocast():
            model.full_pass(x, stats=True, channels_last=True)
        sync()

    tf, tv, ts = best_time(forward, 5), best_time(forward_vjp, 5), best_time(full, 5)
    ta, tr = best_time(passes_autograd, 5), best_time(passes_reverse, 5)
    print(f"{label} ({device}, batch {batch}): forward {tf * 1e3:.1f} ms, forward + input VJP {tv * 1e3:.1f} ms "
          f"({tv / tf:.2f}x), NRM full score {ts * 1e3:.1f} ms ({ts / tf:.2f}x); NRM passes through autograd "
          f"{ta * 1e3:.1f} ms ({ta / tf:.2f}x), in-place reverse {tr * 1e3:.1f} ms ({tr / tf:.2f}x)", flush=True)
    if prof:
        with profile() as p:
            full()
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("indices", nargs="*", type=int, help="bench model indices (default: all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    ap.add_argument("--batch", type=int, default=512, help="batch size (default 512)")
    ap.add_argument("--profile", action="store_true", help="print a profiler table of one full score per model")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared",
                    help="the shared folder with models/cifar10-resnet (default: ../shared beside the repository)")
    a = ap.parse_args()
    main(a.indices, a.device, a.batch, a.profile, a.shared)
