"""Time one training step of nrm.training per precision and memory format (docs/benchmarks.md section 6).

    python scripts/train_steps.py [REPS] [DEVICE]

For each network (the presets gray28, rgb32-small and resnet-cifar at depth 20, random weights), batch
128, AdamW: ``nrm.training.train_step``, the step ``nrm.training.train`` takes, with cross-entropy alone
(``--recon-weight 0``, what fine-tuning a converted ResNet uses) and with the reconstruction term (a
double backward through the renderer), in NCHW and channels-last, fp32 and bf16. Prints a Markdown table of the best of REPS steps (default 10) after two warm-up steps, on DEVICE
(default cpu; scripts/gpu_check.sh runs it on cuda)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nrm  # noqa: E402
from jobs.allocator import keep_freed_memory  # noqa: E402
from jobs.bench.timing import best_time, device_sync  # noqa: E402
from nrm.runner import Runner  # noqa: E402
from nrm.training import make_optimizer, train_step  # noqa: E402

NETS = [("gray28", {}), ("rgb32-small", {}), ("resnet-cifar", {"depth": 20})]


def step_ms(runner: Runner, cfg: nrm.TrainConfig, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    opt = make_optimizer(runner.model, cfg)
    sync = device_sync(x.device)

    def step() -> None:
        train_step(runner, opt, x, y, cfg, [])
        sync()

    step()  # the first warm-up step (AdamW makes its state); best_time takes the second
    return best_time(step, reps) * 1e3


def main(reps: int, device: str) -> None:
    keep_freed_memory()  # as nrm-ood train does (the CLI)
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, batch 128, best of {reps} steps (ms)\n")
    print("| network | loss | NCHW fp32 | channels-last fp32 | NCHW bf16 | channels-last bf16 | bf16 vs fp32, channels-last |")
    print("|---|---|---|---|---|---|---|")
    for name, kw in NETS:
        torch.manual_seed(0)
        model = nrm.NRM(nrm.preset(name, **kw)).to(device).train().requires_grad_(True)
        x = torch.randn(128, *model.input_shape, device=device)
        y = torch.randint(0, len(model.config.classes), (128,), device=device)
        for recon in (0.0, 1.0):
            cfg = nrm.TrainConfig(recon_weight=recon, lr=1e-3)
            ms = {}
            for precision in ("fp32", "bf16"):
                for cl in (False, True):
                    runner = Runner(model, precision=precision, layout="channels_last" if cl else "nchw")
                    ms[precision, cl] = step_ms(runner, cfg, x, y, reps)
            print(f"| {name} | {'CE + reconstruction' if recon else 'CE'} | {ms['fp32', False]:.1f} | {ms['fp32', True]:.1f} | "
                  f"{ms['bf16', False]:.1f} | {ms['bf16', True]:.1f} | {ms['fp32', True] / ms['bf16', True]:.2f}x faster |",
                  flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, sys.argv[2] if len(sys.argv) > 2 else "cpu")
