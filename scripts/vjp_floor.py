"""The floor of a full NRM score: one forward plus one input vector-Jacobian product of the plain
module, through autograd, against the plain forward (docs/benchmarks.md, "Where the time goes").

    python scripts/vjp_floor.py [MODEL_INDEX ...]     # indices into jobs.bench.bench_models (default: all)

For each bench model: the plain module's forward (no grad, channels_last) and forward + d logit_y*/dx
(autograd, channels_last), best of 5, and their ratio. Whatever a full score costs above this ratio
is the NRM's own overhead (eta, statistics, detector)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.allocator import keep_freed_memory  # noqa: E402
from jobs.bench import _time, bench_models  # noqa: E402


def main(indices: list[int]) -> None:
    keep_freed_memory()  # as the CLI and the scoring actors do (jobs/allocator.py)
    shared = Path(__file__).resolve().parents[2] / "shared"
    models = bench_models("cpu", shared if shared.is_dir() else None)
    for i in indices or range(len(models)):
        label, _, plain = models[i]
        module = copy.deepcopy(plain).to(memory_format=torch.channels_last).requires_grad_(False)
        x = torch.randn(512, *models[i][1].input_shape).contiguous(memory_format=torch.channels_last)

        def forward(module: torch.nn.Module = module, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                module(x)

        def forward_vjp(module: torch.nn.Module = module, x: torch.Tensor = x) -> None:
            xg = x.detach().requires_grad_(True)
            logits = module(xg)
            torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), xg)

        tf, tv = _time(forward, 5), _time(forward_vjp, 5)
        print(f"{label}: forward {tf * 1e3:.1f} ms, forward + input VJP {tv * 1e3:.1f} ms, ratio {tv / tf:.2f}x")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
