"""Sections 1 and 1b of `nrm-ood bench`: NRM scoring time / plain inference time of the same network
and batch, eager and with torch.compile, for every preset and the CIFAR ResNets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import nrm
from jobs.bench import timing
from jobs.bench.timing import Echo
from nrm.fit import refit
from nrm.names import DEFAULT_DETECTOR, DEFAULT_FEATURES
from nrm.plan import ScorePlan
from nrm.precision import autocast
from nrm.runner import Runner
from nrm.scores import COLUMNS, RENDERED

# The forward-only columns of the default table: the classifier's and the default detector on gate statistics.
CLASSIFIER = [c for c in COLUMNS if c not in RENDERED]  # pred, max_softmax, max_logit, energy
FORWARD_ONLY = [*CLASSIFIER, "det_mahalanobis"]
BASELINES = ["mahalanobis_feat", "knn", "vim"]  # the post-hoc baselines, fitted with `fit-detector --baselines`


def full_table(model: nrm.NRM) -> list[str]:
    """The full score's columns: every column of the default table, the post-hoc baselines left out."""
    return [c for c in model.columns if c not in BASELINES]


def fit_for_cost(model: nrm.NRM, bank: int = 45000) -> None:
    """Fit the default detector and the post-hoc baselines on random data of the real sizes (a KNN
    bank of ``bank`` rows, as a CIFAR-10 training split gives): only their cost is measured."""
    from nrm.fit import fit_baselines

    device = model.mean.device
    refit(model, [torch.randn(256, *model.input_shape, device=device) for _ in range(2)])
    det = model.config.fitted.detector
    if det is None or det.baselines:
        return
    with torch.no_grad():
        p = model.forward_pass(torch.randn(512, *model.input_shape, device=device))
    f, logits = p.features.float(), p.logits.float()
    feats = f[torch.randint(len(f), (bank,))].cpu() + 0.01 * torch.randn(bank, f.shape[1])
    labels = torch.arange(bank) % len(model.config.classes)
    rows = {"penultimate": feats, "logits": logits.cpu()[torch.randint(len(f), (bank,))], "label": labels}
    det.baselines = fit_baselines(rows, model.head())


def plain_then_fit(model: nrm.NRM, plain_module: torch.nn.Module, batch: int, reps: int,
                    ) -> tuple[torch.Tensor, Callable[[], None], dict[str, Any]]:
    """A random batch, the device's sync, and plain inference at its fastest ({"plain_s", "plain"});
    then the model's detector and baselines are fitted for cost."""
    device = model.mean.device
    x = torch.randn(batch, *model.input_shape, device=device)
    sync = timing.device_sync(device)
    tp, plain_label = timing.fastest(timing.plain_variants(plain_module, x, sync, lambda: autocast("fp32", device.type)), reps)
    fit_for_cost(model)
    return x, sync, {"plain_s": tp, "plain": plain_label}


def overhead(model: nrm.NRM, plain_module: torch.nn.Module, batch: int, reps: int) -> dict[str, Any]:
    """NRM score time / plain inference time, each at its fastest memory format: the default table
    (every NRM column and the default detector), its forward-only columns, the classifier's columns
    alone (no unit statistics), and the post-hoc baselines alone. ``plain_module`` is the user's own
    module (or the NRM itself for a preset)."""
    x, sync, res = plain_then_fit(model, plain_module, batch, reps)
    tp = res["plain_s"]
    default = full_table(model)
    for label, cols in (("score", default), ("forward", FORWARD_ONLY), ("classifier", CLASSIFIER),
                        ("baselines", ["pred", *BASELINES])):
        for cl in (False, True):
            runner = Runner(model, layout="channels_last" if cl else "nchw")

            def run(r: Runner = runner, plan: ScorePlan = model.plan(cols, flag=False)) -> None:
                r.score(x, plan)
                sync()

            res[f"{label}_s_{'cl' if cl else 'nchw'}"] = timing.best_time(run, reps)
        res[f"{label}_s"] = min(res[f"{label}_s_nchw"], res[f"{label}_s_cl"])
        res[f"{label}_ratio"] = res[f"{label}_s"] / tp
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    res["images_per_s"] = batch / res["score_s"]
    return res


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the shared ResNets' normalisation


def bench_models(device: str, shared: Path | None, only: tuple[str, ...] = ()) -> list[tuple[str, nrm.NRM, torch.nn.Module]]:
    """(label, NRM, the module plain inference runs) for every preset and the CIFAR ResNets: the
    shared pretrained ones converted when ``shared`` holds them, else the resnet-cifar preset.
    ``only``: keep the models whose label contains one of these strings (all when empty)."""
    out: list[tuple[str, nrm.NRM, torch.nn.Module]] = []
    for name, width in (("gray28", 0.5), ("gray28", 1.0), ("rgb32-small", 1.0), ("rgb32-allconv", 0.5)):
        m = timing.random_model(nrm.preset(name, width), device)
        out.append((f"{name} w{width}", m, m))
    src = shared / "models" / "cifar10-resnet" if shared else None
    for depth in (20, 56):
        if src is not None and (src / f"resnet{depth}.safetensors").is_file():
            from jobs.convert import build_module, read_weights

            user = build_module(f"{src / 'resnet.py'}:resnet{depth}")
            user.load_state_dict(read_weights(src / f"resnet{depth}.safetensors"))
            converted = nrm.from_torch(user.eval(), (3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)  # its README's
            out.append((f"ResNet-{depth} (pretrained, converted)", converted.to(device), user.to(device)))
        else:
            m = timing.random_model(nrm.preset("resnet-cifar", 1.0, depth=depth), device)
            out.append((f"resnet-cifar depth {depth} (preset)", m, m))
    return [m for m in out if not only or any(o.lower() in m[0].lower() for o in only)]


def speed_section(devices: list[str], batch: int, reps: int, shared: Path | None, echo: Echo,
                  only: tuple[str, ...] = ()) -> list[str]:
    lines = ["## 1. NRM score / plain inference (targets: <= 2.0x full score, <= 1.15x forward-only columns)", "",
             "Plain = the network's own torch module at its fastest: for the ResNets the user's `resnet.py` module "
             "with BatchNorm fused by torch.fx and the faster memory format; for the presets the NRM's own forward "
             "(which is the module), in the faster format. Full score = `Runner(model).score(x)`: forward + one "
             "vector-Jacobian product (the in-place reverse pass, no autograd) + every column of the default "
             f"table, with `nrm-ood train`'s default detector ({DEFAULT_DETECTOR}[{DEFAULT_FEATURES}]) fitted. "
             f"Forward-only = `Runner(model).score(x, model.plan([{', '.join(FORWARD_ONLY)}]))`, no backward pass. "
             "Classifier = its first four columns alone (no unit statistics: what `score --columns` of "
             "confidence columns costs). Baselines = the post-hoc columns alone "
             f"({', '.join(BASELINES)}; KNN with a bank of 45,000 training rows, as CIFAR-10 gives: its cost grows "
             f"with the bank, not with the network). Best of {reps} runs after a warm-up (this VM's timings vary by "
             f"tens of percent between runs; noise only adds time); torch threads "
             f"{torch.get_num_threads()}.", "",
             "| model | device | batch | plain (ms) | plain variant | full score (ms) | ratio | forward-only (ms) "
             "| ratio | classifier (ms) | ratio | baselines (ms) | ratio | NRM images/s | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for device in devices:
        batches = [batch] if device == "cpu" else [512, 4096]
        for label, model, plain in bench_models(device, shared, only):
            for b in batches:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                r = overhead(model, plain, b, reps)
                met = r["score_ratio"] <= 2.0 and r["forward_ratio"] <= 1.15
                mem = f"; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
                lines.append(f"| {label} | {device} | {b} | {r['plain_s'] * 1e3:.1f} | {r['plain']} | "
                             f"{r['score_s'] * 1e3:.1f} | {r['score_ratio']:.2f}x | {r['forward_s'] * 1e3:.1f} | "
                             f"{r['forward_ratio']:.2f}x | {r['classifier_s'] * 1e3:.1f} | {r['classifier_ratio']:.2f}x | "
                             f"{r['baselines_s'] * 1e3:.1f} | {r['baselines_ratio']:.2f}x | "
                             f"{r['images_per_s']:.0f}{mem} | {'yes' if met else 'no'} |")
                echo(f"  {label} {device} b{b}: full {r['score_ratio']:.2f}x, forward-only {r['forward_ratio']:.2f}x, "
                     f"classifier {r['classifier_ratio']:.2f}x")
    if "cuda" not in devices:
        lines += ["", "No GPU on this machine: GPU figures come from `scripts/gpu_check.sh` on a machine with one."]
    return lines


def compiled_overhead(model: nrm.NRM, plain_module: torch.nn.Module, batch: int, reps: int) -> dict[str, Any]:
    """The forward-only columns and the full score (the default table, as in section 1) with
    ``Runner(compile=True)`` in the model's fast layout (as the scoring actors run them: channels_last,
    NCHW for fp32 on CUDA), against plain inference eager at its fastest and the plain module compiled
    in the same layout (the targets count the larger ratio: ``like_for_like``); each first call's seconds are
    its compile time."""
    import copy

    x, sync, res = plain_then_fit(model, plain_module, batch, reps)
    runner = Runner(model, compile=True)
    layout = torch.channels_last if runner.channels_last else torch.contiguous_format
    tp, xin = res["plain_s"], x.contiguous(memory_format=layout)
    module = torch.compile(copy.deepcopy(plain_module).to(memory_format=layout))  # type: ignore[call-overload]

    def plain_run() -> None:
        with torch.no_grad(), runner.autocast():
            module(xin)
        sync()

    res["plain_compile_s"] = timing.first_call(plain_run)
    res["plain_compiled_s"] = timing.best_time(plain_run, reps)
    default = full_table(model)
    for label, cols in (("forward", FORWARD_ONLY), ("score", default)):
        def run(plan: ScorePlan = model.plan(cols, flag=False)) -> None:
            runner.score(x, plan)
            sync()

        res[f"{label}_compile_s"] = timing.first_call(run)
        res[f"{label}_s"] = timing.best_time(run, reps)
        res[f"{label}_ratio"] = res[f"{label}_s"] / tp
        res[f"{label}_ratio_compiled"] = res[f"{label}_s"] / res["plain_compiled_s"]
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return res


def like_for_like(r: dict[str, Any], label: str) -> float:
    """The compiled ``label`` columns' ratio that the targets count: the larger of the ratios to eager
    plain and to compiled plain (a compiled NRM against an eager module would flatter it)."""
    return max(r[f"{label}_ratio"], r[f"{label}_ratio_compiled"])


def compile_section(device: str, batch: int, reps: int, shared: Path | None, echo: Echo,
                    only: tuple[str, ...] = ()) -> list[str]:
    """The forward-only columns and the full score of section 1 again with torch.compile (``nrm-ood
    score --compile``); ``batch`` on a CPU, 4096 on a GPU."""
    batch = batch if device == "cpu" else 4096
    lines = ["## 1b. With torch.compile (`nrm-ood score --compile`)", "",
             "The forward-only columns and the full score of section 1 with `Runner(compile=True)` (inductor, in the "
             "model's fast layout as the scoring actors run it; the full score's forward and top-down walk compile "
             "as one graph, so the ReLUs, their gradients, the residual sums and the statistics fuse into a few "
             "loops around the convolutions), against plain inference as in section 1 (eager, at its fastest: the "
             "first ratio) and against the plain module compiled the same way; the targets count the larger of the two. "
             f"Compile = the first call's seconds, paid once per batch shape and actor. Best of {reps} runs after "
             "that call.", "",
             "| model | device | batch | plain eager (ms) | plain compiled (ms) | forward-only compiled (ms) "
             "| ratio to eager plain | ratio to compiled plain | full score compiled (ms) | ratio to eager plain "
             "| ratio to compiled plain | compile s (plain / forward-only / full) | targets met (like for like) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, model, plain in bench_models(device, shared, only):
        r = compiled_overhead(model, plain, batch, reps)
        met = like_for_like(r, "forward") <= 1.15 and like_for_like(r, "score") <= 2.0
        lines.append(f"| {label} | {device} | {batch} | {r['plain_s'] * 1e3:.1f} | {r['plain_compiled_s'] * 1e3:.1f} | "
                     f"{r['forward_s'] * 1e3:.1f} | {r['forward_ratio']:.2f}x | {r['forward_ratio_compiled']:.2f}x | "
                     f"{r['score_s'] * 1e3:.1f} | {r['score_ratio']:.2f}x | {r['score_ratio_compiled']:.2f}x | "
                     f"{r['plain_compile_s']:.0f} / {r['forward_compile_s']:.0f} / {r['score_compile_s']:.0f} | "
                     f"{'yes' if met else 'no'} |")
        echo(f"  {label} compiled: forward-only {r['forward_ratio']:.2f}x ({r['forward_ratio_compiled']:.2f}x of compiled "
             f"plain), full {r['score_ratio']:.2f}x ({r['score_ratio_compiled']:.2f}x)")
    return lines
