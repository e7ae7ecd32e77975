"""Variants of the gate-statistics detector on validation data (docs/results.md section 6, "What was tried").

    python scripts/detector_variants.py CKPT [--rows 20000]

Collects the forward-pass statistics of CKPT (ReLU on-rates and mean activations of every biased
layer, energy) on CIFAR-10 train rows (the detector's fitting rows), on the held-out 10% that
`nrm-ood train` / `fit-detector` keep (seed 0) and on the validation OOD sets (TinyImageNet
train_sample, textures32's validation half, noise seed 3), then prints the validation AUROC of:
a Mahalanobis on layer subsets (by stage, for the CIFAR ResNets' 16/32/64-channel stages), KNN on the
gate statistics, and the fusion with energy at weights 0.5 / 1 / 2. Never a report set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nrm  # noqa: E402
from jobs.datasets import load_images, load_labelled  # noqa: E402
from jobs.storage import Store  # noqa: E402
from nrm.detectors import fit_mahalanobis, mahalanobis  # noqa: E402
from nrm.metrics import auroc  # noqa: E402
from nrm.runner import Runner  # noqa: E402
from nrm.training import batches  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
VAL_OOD = {"tin": str(SHARED / "tinyimagenet" / "train_sample"), "textures": "data/textures32-val", "noise": "data/noise32-val"}


@torch.no_grad()
def stats(r: Runner, images: torch.Tensor, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    plan = r.model.plan(["pred", "energy"], ("latent_gates", "unit_acts"), flag=False)
    for x in batches(r.model, images, 512, idx):
        cols = r.score(x, plan)
        for k in ("pred", "energy", "latent_gates", "unit_acts"):
            out.setdefault(k, []).append(cols[k])
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--rows", type=int, default=20000, help="training rows the detectors are fitted on")
    a = ap.parse_args()
    r, store = Runner(nrm.load(a.ckpt), layout="channels_last"), Store(None)
    m = r.model
    x, _ = load_labelled(str(SHARED / "cifar10" / "train"), m.input_shape, None, store)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    images = torch.from_numpy(x)
    train, held = stats(r, images, perm[5000 : 5000 + a.rows]), stats(r, images, perm[:5000])
    ood = {k: stats(r, torch.from_numpy(load_images(v, m.input_shape, 2000, store))) for k, v in VAL_OOD.items()}
    width = train["latent_gates"].shape[1]
    stage = [m.shapes[n][0] for n in m.latent_names]  # channels per biased layer
    bounds = torch.tensor([0, *stage]).cumsum(0)
    subsets = {"all": (0, width)}
    for c in sorted(set(stage)):  # consecutive layers of one width: a stage of the CIFAR ResNets
        idx = [i for i, s in enumerate(stage) if s == c]
        subsets[f"{c}-channel layers"] = (int(bounds[idx[0]]), int(bounds[idx[-1] + 1]))
    widths = sorted(set(stage))
    if len(widths) > 1:  # the two widest stages together
        subsets["the two widest stages"] = (int(bounds[stage.index(widths[-2])]), width)
    for n in (2, 4):  # the last n biased layers: the last one or two residual blocks
        subsets[f"the last {n} layers"] = (int(bounds[-n - 1]), width)

    def report(label: str, score) -> None:  # type: ignore[no-untyped-def]
        pos = score(held).numpy()
        print(f"{label:40s}", {k: round(float(auroc(pos, score(v).numpy())), 4) for k, v in ood.items()})

    def maha(lo: int, hi: int, acts: bool = False):  # type: ignore[no-untyped-def]
        f = lambda d: torch.cat([d["latent_gates"][:, lo:hi], d["unit_acts"][:, lo:hi]] if acts else [d["latent_gates"][:, lo:hi]], 1).double()  # noqa: E731
        st = fit_mahalanobis(f(train), train["pred"].long(), len(m.config.classes))
        return lambda d: mahalanobis(f(d), d["pred"].long(), st["means"], st["precision"])

    for name, (lo, hi) in subsets.items():
        report(f"mahalanobis gates, {name}", maha(lo, hi))
    report("mahalanobis gates_acts, all", maha(0, width, True))
    prep = lambda f: f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    bank = prep(train["latent_gates"].float())
    for k in (10, 50):
        report(f"knn k={k} on L2-normalised gates", lambda d, k=k: -torch.cdist(prep(d["latent_gates"].float()), bank).topk(k, largest=False).values[:, -1])
    fit_half = {k: v[:2500] for k, v in held.items()}
    for feats, g in (("gates", maha(0, width)), ("gates_acts", maha(0, width, True))):
        z = lambda s, ref: (lambda d: (s(d) - ref.mean()) / ref.std())  # noqa: E731
        e = lambda d: -d["energy"].double()  # noqa: E731
        zg, ze = z(g, g(fit_half)), z(e, e(fit_half))
        for w in (0.5, 1.0, 2.0):
            report(f"{feats} + {w} x energy", lambda d, zg=zg, ze=ze, w=w: zg(d) + w * ze(d))


if __name__ == "__main__":
    main()
