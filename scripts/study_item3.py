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
and KNN (k = 50) on the penultimate features of the first 20,000 training rows, for comparison.
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
    if fit != "half" and "train" not in r:
        r = {}  # no ReLU-node statistics of training rows cached
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
        knn = D.KNN(k=50).fit({"penultimate": s["train"]["feats"][:20000]}, k)
        sp = knn.score({"penultimate": s["held"]["feats"][b_idx]}).numpy()
        res = {o: float(metrics.auroc(sp, knn.score({"penultimate": s[f"val_{o}"]["feats"]}).numpy())) for o in oods}
        print("| KNN k=50 on the penultimate features (first 20,000 training rows) | - | "
              + " | ".join(f"{res[o]:.3f}" for o in oods) + f" | {min(res.values()):.3f} |")
    for relu, src in ((False, s), (True, r)):
        if not src:
            continue
        lo = 0
        key = "relu_gates" if relu else "latent_gates"
        for layer, c in blocks(m, relu):
            row(f"{'ReLU' if relu else 'bias'} {layer}", src, key, lo, lo + c)
            lo += c


def variants(name: str, ckpt: str, cache: Path, fit: str) -> None:
    """Pure NRM variants of the gate-statistics Gaussian, validation AUROC (half B against each real
    validation OOD set): the reference gates_acts Gaussian; a sum over layers of per-layer Gaussian
    scores, each standardised on half A (Lee et al. 2018's layer ensemble, equal weights); covariance
    shrinkage toward its diagonal; sqrt of the mean activations; a class-agnostic Gaussian; the
    closest class instead of y*; the ReLU nodes' statistics added (half A fits, needs the relu cache)."""
    m = nrm.load(ckpt)
    k = len(m.config.classes)
    s = load(cache / name)
    r = load(cache / name / "relu") if (cache / name / "relu").exists() else {}
    a_idx, b_idx = D.split_halves(len(s["held"]["pred"]))
    oods = [o[4:] for o in s if o.startswith("val_")]
    fit_split, fit_idx = ("held", a_idx) if fit == "half" else ("train", torch.arange(20000))

    def feats(split: str, fn, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        f, p = fn(split), s[split]["pred"].long()
        return (f, p) if idx is None else (f[idx], p[idx])

    base = lambda sp: torch.cat([s[sp]["latent_gates"], s[sp]["unit_acts"]], 1).double()  # noqa: E731
    sq = lambda sp: torch.cat([s[sp]["latent_gates"], s[sp]["unit_acts"].clamp_min(0).sqrt()], 1).double()  # noqa: E731
    both = lambda sp: torch.cat([base(sp), r[sp]["relu_gates"].double(), r[sp]["relu_acts"].double()], 1)  # noqa: E731

    def evaluate(label: str, score) -> None:  # noqa: ANN001
        sp = score("held", b_idx)
        res = {o: float(metrics.auroc(sp, score(f"val_{o}"))) for o in oods}
        print(f"| {label} | " + " | ".join(f"{res[o]:.3f}" for o in oods) + f" | {min(res.values()):.3f} |", flush=True)

    def gaussian(fn, shrink: float = 0.0, classes: bool = True, closest: bool = False):  # noqa: ANN001, ANN202
        f, p = feats(fit_split, fn, fit_idx)
        st = D.fit_mahalanobis(f, p if classes else torch.zeros_like(p), k if classes else 1)
        if shrink:
            cov = torch.linalg.inv(st["precision"])
            st["precision"] = torch.linalg.inv((1 - shrink) * cov + shrink * torch.diag(cov.diagonal()))

        def score(split: str, idx: Tensor | None = None) -> object:
            g, q = feats(split, fn, idx)
            if closest:
                return torch.stack([D.mahalanobis(g, torch.full_like(q, c), st["means"], st["precision"])
                                    for c in range(k)]).amax(0).numpy()
            return D.mahalanobis(g, q if classes else torch.zeros_like(q), st["means"], st["precision"]).numpy()
        return score

    print(f"\n**{name}** variants (fitted on {fit})\n")
    print("| variant | " + " | ".join(oods) + " | worst |\n|---|" + "---|" * (len(oods) + 1))
    evaluate("gates_acts Gaussian (reference)", gaussian(base))
    bounds = [0]
    for _, c in blocks(m, False):
        bounds.append(bounds[-1] + c)
    width = bounds[-1]
    layer_scores = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        cols = torch.tensor([*range(lo, hi), *range(width + lo, width + hi)])
        layer_scores.append(gaussian(lambda sp, cols=cols: base(sp)[:, cols]))
    ref = [torch.as_tensor(ls("held", a_idx)) for ls in layer_scores]
    mu, sd = [float(v.mean()) for v in ref], [float(v.std()) for v in ref]
    evaluate("sum of per-layer Gaussians, standardised on half A",
             lambda sp, idx=None: sum((torch.as_tensor(ls(sp, idx)) - u) / d
                                      for ls, u, d in zip(layer_scores, mu, sd, strict=True)).numpy())
    for a in (0.01, 0.1, 0.5):
        evaluate(f"shrinkage {a} toward the diagonal", gaussian(base, shrink=a))
    evaluate("sqrt of the mean activations", gaussian(sq))
    evaluate("class-agnostic Gaussian", gaussian(base, classes=False))
    evaluate("closest class instead of y*", gaussian(base, closest=True))
    if r and fit == "half":
        evaluate("plus the ReLU nodes' gates and activations", gaussian(both))


def jpeg_probe(name: str, ckpt: str, cache: Path) -> None:
    """Does a detector separate TinyImageNet from CIFAR-10 by the JPEG artifacts of the shared
    CIFAR-10 copy? TinyImageNet train_sample (validation; the first 2,000 rows at 32x32, as cached)
    re-encoded as JPEG quality 75 at 32x32, against the same rows as cached; in-distribution half B
    of the held-out rows; Gaussians fitted on the first 20,000 training rows, KNN on the same rows."""
    from jobs.datasets import load_images
    from nrm.runner import Runner
    from scripts.study_cache import jpeg, score_all

    r = Runner(nrm.load(ckpt))
    m = r.model
    path = cache / name / "probe_tin_jpeg.pt"
    if not path.exists():
        x = torch.from_numpy(load_images("/work/shared/datasets/tinyimagenet/train_sample", m.input_shape, 2000))
        torch.save(score_all(r, jpeg(x), False), path)
    s = load(cache / name)
    probe = torch.load(path)
    b = D.split_halves(len(s["held"]["pred"]))[1]
    pos, train = rows_of(s["held"], b), rows_of(s["train"], torch.arange(20000))
    print(f"\n**{name}**: AUROC against TinyImageNet train_sample as cached / re-encoded as JPEG q75\n")
    for fs in ("gates", "gates_acts"):
        st = D.fit_mahalanobis(D.features(train, fs), train["pred"].long(), len(m.config.classes))
        sc = lambda c, fs=fs, st=st: D.mahalanobis(D.features(c, fs), c["pred"].long(), st["means"], st["precision"]).numpy()  # noqa: E731
        print(f"- mahalanobis[{fs}]: {metrics.auroc(sc(pos), sc(s['val_tin'])):.3f} / {metrics.auroc(sc(pos), sc(probe)):.3f}")
    bounds, lo = {}, 0
    for _layer, c in blocks(m, False):  # consecutive layers of one width: a stage of the CIFAR ResNets
        bounds.setdefault(c, [lo, lo])[1] = lo + c
        lo += c
    width = lo
    for c, (a, z) in bounds.items():
        cols = torch.tensor([*range(a, z), *range(width + a, width + z)])
        f = lambda d, cols=cols: D.features(d, "gates_acts")[:, cols]  # noqa: E731
        st = D.fit_mahalanobis(f(train), train["pred"].long(), len(m.config.classes))
        sc = lambda d, f=f, st=st: D.mahalanobis(f(d), d["pred"].long(), st["means"], st["precision"]).numpy()  # noqa: E731
        print(f"- mahalanobis[gates_acts] of the {c}-channel layers: {metrics.auroc(sc(pos), sc(s['val_tin'])):.3f} / "
              f"{metrics.auroc(sc(pos), sc(probe)):.3f}")
    knn = D.KNN(k=50).fit({"penultimate": train["feats"]}, len(m.config.classes))
    kn = lambda c: knn.score({"penultimate": c["feats"]}).numpy()  # noqa: E731
    print(f"- KNN k=50: {metrics.auroc(kn(pos), kn(s['val_tin'])):.3f} / {metrics.auroc(kn(pos), kn(probe)):.3f}")
    en = lambda c: (-c["energy"]).numpy()  # noqa: E731
    print(f"- energy: {metrics.auroc(en(pos), en(s['val_tin'])):.3f} / {metrics.auroc(en(pos), en(probe)):.3f}")


def rows_of(cols: Cols, idx: Tensor) -> Cols:
    return {k: v[idx] for k, v in cols.items()}


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
          f"{int((diff > 0).sum())} of {diff.numel()} (one position flipping changes a rate by 1 / the map's positions)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("networks", nargs="+", help="NAME=CKPT")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--fit", choices=["half", "train20k"], default="half")
    ap.add_argument("--bn-check", nargs=2, metavar=("MODULE", "WEIGHTS"),
                    help="instead: compare the gates of the unfolded torch module (path.py:factory) with the first NAME=CKPT")
    ap.add_argument("--jpeg-probe", action="store_true", help="instead: TinyImageNet re-encoded as JPEG (jpeg_probe)")
    ap.add_argument("--variants", action="store_true", help="instead: the pure NRM variants of the Gaussian")
    a = ap.parse_args()
    if a.jpeg_probe:
        for spec in a.networks:
            name, _, ckpt = spec.partition("=")
            jpeg_probe(name, ckpt, a.cache)
        return
    if a.variants:
        for spec in a.networks:
            name, _, ckpt = spec.partition("=")
            variants(name, ckpt, a.cache, a.fit)
        return
    if a.bn_check:
        bn_check(a.networks[0].partition("=")[2], *a.bn_check)
        return
    for spec in a.networks:
        name, _, ckpt = spec.partition("=")
        network(name, ckpt, a.cache, a.fit)


if __name__ == "__main__":
    main()
