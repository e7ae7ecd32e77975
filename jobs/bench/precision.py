"""Section 2 of `nrm-ood bench`: the full score per precision on ResNet-20, eager and compiled, against
plain inference in the same precision, and the change in AUROC on the shared sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import nrm
from jobs.bench import timing
from jobs.bench.speed import bench_models, fit_for_cost, full_table
from jobs.bench.timing import Echo
from nrm.plan import ScorePlan
from nrm.runner import Runner


def precision_section(device: str, batch: int, reps: int, shared: Path | None, echo: Echo) -> list[str]:
    """Speed of the full score per precision on ResNet-20, eager and compiled, against plain inference
    in the same precision, and (with the shared data) the change in AUROC; ``batch`` on a CPU, 4096 on
    a GPU."""
    batch = batch if device == "cpu" else 4096
    label, model, plain = bench_models(device, shared)[4]  # ResNet-20
    x = torch.randn(batch, *model.input_shape, device=device)
    sync = timing.device_sync(device)
    auroc = precision_auroc(model, shared, device) if shared else {}
    fit_for_cost(model)
    default = full_table(model)
    lines = ["## 2. Reduced precision (`--precision`)", "",
             f"{label}, {device}, batch {batch}, full score (section 1's), channels_last, eager and with "
             "`--compile`; plain = the user's module in the same precision at its fastest (as section 1). AUROC of "
             "`latent_prior` and `max_logit` (CIFAR-10 test, first 2,000 rows, against textures32's report half and "
             "MNIST as RGB, first 2,000 rows) with the same fitted state, eager.", "",
             "| precision | plain (ms) | full score (ms) | ratio to plain | speed vs fp32 | full score compiled (ms) "
             "| ratio to plain | speed vs fp32 eager | AUROC textures32 latent_prior / max_logit "
             "| AUROC MNIST latent_prior / max_logit |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = None
    plan = model.plan(default, flag=False)
    for p in ("fp32", "bf16", "fp16", "tf32"):
        try:
            tp, _ = timing.fastest(timing.plain_variants(plain, x, sync, Runner(model, precision=p, layout="nchw").autocast),
                                   reps)
            t = _score_s(Runner(model, precision=p, layout="channels_last"), x, plan, sync, reps)
        except RuntimeError as e:  # a precision this device cannot run
            lines.append(f"| {p} | not available ({str(e).splitlines()[0][:80]}) | | | | | | | | |")
            continue
        base = base or t
        compiled, compiled_ms = "not run (fp16 on a CPU: slower than fp32, eager) | - | -", "not run"
        if device != "cpu" or p != "fp16":
            runner = Runner(model, precision=p, layout="channels_last", compile=True)
            runner.score(x, plan)  # compiles
            tc = _score_s(runner, x, plan, sync, reps)
            compiled_ms = f"{tc * 1e3:.1f} ms"
            compiled = f"{tc * 1e3:.1f} | {tc / tp:.2f}x | {base / tc:.2f}x"
        cells = [_auroc_cell(auroc.get(p, {}), name) for name in ("textures32", "mnist")]
        lines.append(f"| {p} | {tp * 1e3:.1f} | {t * 1e3:.1f} | {t / tp:.2f}x | {base / t:.2f}x | {compiled} | "
                     f"{cells[0]} | {cells[1]} |")
        echo(f"  {p}: plain {tp * 1e3:.1f} ms, full {t * 1e3:.1f} ms, compiled {compiled_ms}")
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return lines


def _score_s(runner: Runner, x: torch.Tensor, plan: ScorePlan, sync: Callable[[], None], reps: int) -> float:
    """Best-run seconds of ``runner.score(x, plan)``."""
    def run() -> None:
        runner.score(x, plan)
        sync()

    return timing.best_time(run, reps)


def _auroc_cell(a: dict[str, dict[str, float]], name: str) -> str:
    return " / ".join(f"{a[name][c]:.4f}" for c in ("latent_prior", "max_logit")) if name in a else "-"


def precision_auroc(model: nrm.NRM, shared: Path, device: str) -> dict[str, dict[str, dict[str, float]]]:
    """precision -> OOD set -> column -> AUROC, on the shared sets (empty when they are absent)."""
    from jobs.datasets import load_images
    from nrm.metrics import auroc

    data = shared / "datasets"
    sets = {"in": data / "cifar10" / "test", "textures32": data / "textures32" / "test", "mnist": data / "mnist" / "test"}
    if not all(p.is_dir() for p in sets.values()):
        return {}
    xs = {k: model.preprocess(torch.from_numpy(load_images(str(v), model.input_shape, 2000))) for k, v in sets.items()}
    order = np.random.default_rng(0).permutation(len(xs["textures32"]))  # scripts/split_textures.py's report half
    xs["textures32"] = xs["textures32"][torch.from_numpy(np.sort(order[len(order) // 2 :]))]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for p in ("fp32", "bf16", "fp16", "tf32"):
        runner = Runner(model, precision=p, layout=None)
        try:
            cols = {k: {c: torch.cat([runner.score(v[i : i + 256], model.plan([c], flag=False))[c]
                                      for i in range(0, len(v), 256)])
                        for c in ("latent_prior", "max_logit")} for k, v in xs.items()}
        except RuntimeError:
            continue
        out[p] = {k: {c: float(auroc(cols["in"][c].double().cpu().numpy(), cols[k][c].double().cpu().numpy()))
                      for c in ("latent_prior", "max_logit")} for k in ("textures32", "mnist")}
    return out
