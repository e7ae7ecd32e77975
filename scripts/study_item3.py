"""Why the pure NRM score falls behind KNN on the fine-tuned ResNet-20 (docs/study-default-detector.md
section 5): per-layer validation AUROC of the gate statistics, from scripts/study_cache.py's cache.

    python scripts/study_item3.py NAME=CKPT [...] --cache DIR [--fit half|train20k]

For each network, a class-conditional Gaussian at y* (nrm.detectors.fit_mahalanobis) is fitted on
the chosen fitting rows and scored on half B of the held-out rows against each real validation OOD
set (never a report split), on:
- each bias layer's gate on-rates alone (latent_gates: the conv outputs, before a residual add);
- each ReLU node's gate on-rates alone (the cache's relu/ split: the network's own ReLU latents,
  the ReLUs after the residual adds included);
- all layers together: gates, gates_acts (today's features), the ReLU nodes' gates and
  gates_acts, and both;
and KNN (k = 50) on the penultimate features fitted on the training rows, for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nrm  # noqa: E402
from nrm import detectors as D  # noqa: E402
from nrm import metrics  # noqa: E402
from nrm import posthoc as P  # noqa: E402

Cols = dict[str, Tensor]


def load(path: Path, report: bool = False) -> dict[str, Cols]:
    return {p.stem: torch.load(p) for p in sorted(path.glob("*.pt")) if report or not p.stem.startswith("test_")}


def gauss_auroc(fit_f: Tensor, fit_pred: Tensor, pos: tuple[Tensor, Tensor], negs: dict[str, tuple[Tensor, Tensor]],
                k: int) -> dict[str, float]:
    """AUROC of a Gaussian fitted on (fit_f, fit_pred), in-distribution ``pos`` = (f, pred) against each OOD set."""
    st = D.fit_mahalanobis(fit_f.double(), fit_pred.long(), k)
    s = lambda f, p: D.mahalanobis(f.double(), p.long(), st["means"], st["precision"]).numpy()  # noqa: E731
    sp = s(*pos)
    return {n: float(metrics.auroc(sp, s(*v))) for n, v in negs.items()}


def blocks(m: nrm.NRM, relu: bool) -> list[tuple[str, int]]:
    """(layer name, channels) in the order of the cached columns: bias nodes, or ReLU nodes."""
    if not relu:
        return [(n, m.shapes[n][0]) for n in m.latent_names]
    return [(n.name, m.shapes[n.name][0]) for n in m.config.nodes if type(n.op).__name__ == "ReLU"]


def network(name: str, ckpt: str, cache: Path, fit: str) -> None:
    m = nrm.load(ckpt)
    k = len(m.config.classes)
    s = load(cache / name)
    r = load(cache / name / "relu") if (cache / name / "relu").exists() else {}
    a_idx, b_idx = D.split_halves(len(s["held"]["pred"]))
    n_fit = 20000 if fit == "train20k" else None
    oods = [k_[4:] for k_ in s if k_.startswith("val_")]

    def view(src: dict[str, Cols], key: str, lo: int, hi: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], dict]:
        def part(split: str, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
            f = torch.cat([src[split][c][:, lo:hi] for c in key.split("+")], 1)
            p = s[split]["pred"]
            return (f, p) if idx is None else (f[idx], p[idx])
        ff, fp = part("held", a_idx) if fit == "half" else part("train", torch.arange(n_fit or 0))
        return ff, fp, part("held", b_idx), {o: part(f"val_{o}") for o in oods}

    def row(label: str, src: dict[str, Cols], key: str, lo: int, hi: int) -> None:
        ff, fp, pos, negs = view(src, key, lo, hi)
        res = gauss_auroc(ff, fp, pos, negs, k)
        print(f"| {label} | {ff.shape[1]} | " + " | ".join(f"{res[o]:.3f}" for o in oods) + f" | {min(res.values()):.3f} |")

    print(f"\n**{name}** (fitted on {fit}; in-distribution: half B of the held-out rows)\n")
    print("| features | dims | " + " | ".join(oods) + " | worst |\n|---|---|" + "---|" * (len(oods) + 1))
    width = s["held"]["latent_gates"].shape[1]
    row("gates, all bias layers", s, "latent_gates", 0, width)
    row("gates_acts, all bias layers", s, "latent_gates+unit_acts", 0, width)
    if r:
        rw = r["held"]["relu_gates"].shape[1]
        row("ReLU gates, all ReLU nodes", r, "relu_gates", 0, rw)
        row("ReLU gates_acts, all ReLU nodes", r, "relu_gates+relu_acts", 0, rw)
    if "train" in s:
        knn = P.KNN().fit(s["train"]["feats"])
        sp = knn.score(s["held"]["feats"][b_idx]).numpy()
        res = {o: float(metrics.auroc(sp, knn.score(s[f"val_{o}"]["feats"]).numpy())) for o in oods}
        print("| KNN k=50 on the penultimate features (all training rows) | - | "
              + " | ".join(f"{res[o]:.3f}" for o in oods) + f" | {min(res.values()):.3f} |")
    for relu, src in ((False, s), (True, r)):
        if not src:
            continue
        lo = 0
        key = "relu_gates" if relu else "latent_gates"
        for layer, c in blocks(m, relu):
            row(f"{'ReLU' if relu else 'bias'} {layer}", src, key, lo, lo + c)
            lo += c


def bn_check(ckpt: str, module: str, weights: str, n: int = 500) -> None:
    """Folding BatchNorm into the conv changes no gate: the on-rates of the original torch module's
    BatchNorm outputs (hooks, BatchNorm unfolded, eval mode) against NRM.score's latent_gates of the
    converted checkpoint, on the first n CIFAR-10 training rows."""
    import importlib.util

    import safetensors.torch

    from jobs.datasets import load_images

    path, _, factory = module.rpartition(":")
    spec = importlib.util.spec_from_file_location("user_resnet", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    net = getattr(mod, factory)().eval()
    net.load_state_dict(safetensors.torch.load_file(weights))
    m = nrm.load(ckpt)
    x = m.preprocess(torch.from_numpy(load_images("/work/shared/datasets/cifar10/train", m.input_shape, n)))
    rates: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: rates.append((o > 0).float().mean(dim=(2, 3))))
             for b in net.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    torch_gates = torch.cat(rates, 1)
    nrm_gates = m.score(x, columns=["pred"], unit_stats=True)["latent_gates"]
    diff = (torch_gates - nrm_gates).abs()
    print(f"BatchNorm unfolded (torch module) against folded (NRM): {torch_gates.shape[1]} gate on-rates x {n} images, "
          f"max |difference| {float(diff.max()):.2e}, mean {float(diff.mean()):.2e}; rates differ in "
          f"{int((diff > 0).sum())} of {diff.numel()} (one position flipping changes a rate by 1/{32 * 32} at most per map)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("networks", nargs="+", help="NAME=CKPT")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--fit", choices=["half", "train20k"], default="half")
    ap.add_argument("--bn-check", nargs=2, metavar=("MODULE", "WEIGHTS"),
                    help="instead: compare the gates of the unfolded torch module (path.py:factory) with the first NAME=CKPT")
    a = ap.parse_args()
    if a.bn_check:
        bn_check(a.networks[0].partition("=")[2], *a.bn_check)
        return
    for spec in a.networks:
        name, _, ckpt = spec.partition("=")
        network(name, ckpt, a.cache, a.fit)


if __name__ == "__main__":
    main()
