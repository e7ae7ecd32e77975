"""Which fitted detector separates low- AND high-variance OOD data? (issue 7; docs/results-detectors.md)

For each checkpoint NAME=DIR (its in-distribution set is read from config/train_report: the
gray models' data set is given with --in):

- in-distribution: the rows `nrm-ood train` held out of the TRAIN split (seed-0 permutation, first
  10 %, never trained on) are split in two seeded halves by nrm.detectors.split_halves: the first
  fits every detector, the second is the in-distribution side of the VALIDATION comparison;
  the TEST split is the in-distribution side of the REPORT.
- OOD, validation: the first --ood-val rows of the other sets' TRAIN splits, the first half of
  textures32 (seeded permutation, same as scripts/normaliser_comparison.py) and --ood-val images of
  uniform noise drawn with seed 3 (the report sets use seeds 1 and 2).
- OOD, report: the other sets' TEST splits, the second half of textures32 and --noise (the
  `scripts/make_noise.py` file of the model's size, seed 0), when given.

Choices (the winner) are made on validation AUROCs only: the detector with the best worst-case
(minimum over OOD sets) validation AUROC, averaged over checkpoints. The row ``choose`` is the
per-checkpoint choice of nrm.detectors.choose (what `nrm-ood fit-detector --val-ood` does) on the same
validation sets. Prints markdown.

    python scripts/ood_experiments.py --data /work/shared/datasets \
        --model fmnist=/work/ckpts/fmnist:fashion_mnist --model mnist=/work/ckpts/mnist:mnist ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import nrm
from jobs.datasets import load_images, load_labelled
from nrm import detectors as D
from nrm import metrics
from nrm.fit import collect
from nrm.scores import HIGHER_IS_IN
from nrm.training import held_out_split

SETS = ("mnist", "fashion_mnist", "cifar10")
BASELINES = ("max_softmax", "energy", "max_logit", "latent_prior", "latent_loglik", "recon_sq_error", "loglik_bound")
CANDIDATES = [(name, fs) for name in D.DETECTORS for fs in D.FEATURE_SETS if not (name == "gmm" and fs == "eta")]


def textures_half(n: int, first: bool) -> np.ndarray:
    order = np.random.default_rng(0).permutation(n)
    return order[: n // 2] if first else order[n // 2 :]


def stats(model: nrm.NRM, images: np.ndarray) -> dict[str, torch.Tensor]:
    pre = (model.preprocess(torch.from_numpy(images[i : i + 500])) for i in range(0, len(images), 500))
    return collect(model, pre)


def splits(model: nrm.NRM, ckpt: Path, ind: str, data: Path, ood_val: int,
           noise: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """Score columns of every split (see the module docstring), keyed 'in_fit', 'in_val', 'in_test',
    'val:<set>', 'test:<set>'."""
    shape = model.input_shape
    report = json.loads((ckpt / "train_report.json").read_text())
    n = int(report["train_rows"])
    x, _ = load_labelled(str(data / ind / "train"), shape, limit=n)
    held, _ = held_out_split(n, 0.1, torch.Generator().manual_seed(0))  # the rows nrm.training holds out
    fit_i, val_i = D.split_halves(len(held))
    out = {"in_fit": stats(model, x[held[fit_i].numpy()]), "in_val": stats(model, x[held[val_i].numpy()])}
    out["in_test"] = stats(model, load_labelled(str(data / ind / "test"), shape)[0])
    for other in (s for s in SETS if s != ind):
        if other == "cifar10" and shape[0] == 1 and ind != "cifar10":
            continue  # gray models: the goals name MNIST / Fashion-MNIST and textures only
        out[f"val:{other}"] = stats(model, load_labelled(str(data / other / "train"), shape, limit=ood_val)[0])
        out[f"test:{other}"] = stats(model, load_labelled(str(data / other / "test"), shape)[0])
    tex = load_labelled(str(data / "textures32" / "test"), shape)[0]
    out["val:textures32"] = stats(model, tex[textures_half(len(tex), True)])
    out["test:textures32"] = stats(model, tex[textures_half(len(tex), False)])
    c, h, w = shape
    out["val:noise"] = stats(model, np.random.default_rng(3).integers(0, 256, (ood_val, h, w, c), dtype=np.uint8))
    if noise is not None:
        out["test:noise"] = stats(model, load_images(noise.format(size=h), shape))
    return out


def column(cols: dict[str, torch.Tensor], name: str) -> np.ndarray:
    v = cols[name].double()
    return (v if HIGHER_IS_IN[name] else -v).numpy()


def aurocs(s: dict[str, dict[str, torch.Tensor]], score) -> dict[str, float]:  # noqa: ANN001
    """AUROC (in-distribution positive) of ``score(cols) -> np.ndarray`` for every OOD split."""
    res = {}
    for key in s:
        if ":" in key:
            part = "in_val" if key.startswith("val:") else "in_test"
            res[key] = metrics.auroc(score(s[part]), score(s[key]))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--model", action="append", required=True, help="NAME=CKPT_DIR:IN_SET (IN_SET in mnist, fashion_mnist, cifar10)")
    ap.add_argument("--ood-val", type=int, default=2000, help="rows of each OOD TRAIN split for validation")
    ap.add_argument("--cache", type=Path, default=None, help="directory to cache score columns in")
    ap.add_argument("--noise", type=str, default=None, help="report noise Parquet; {size} is the model's image size")
    ap.add_argument("--gmm-components", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    results: dict[str, dict[str, dict[str, float]]] = {}  # model -> method -> split -> auroc
    for spec in args.model:
        name, _, rest = spec.partition("=")
        ckpt, _, ind = rest.rpartition(":")
        model = nrm.load(ckpt)
        cache = args.cache / f"{name}.pt" if args.cache else None
        if cache and cache.exists():
            s = torch.load(cache)
        else:
            s = splits(model, Path(ckpt), ind, args.data, args.ood_val, args.noise)
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(s, cache)
        k = len(model.config.classes)
        res = {b: aurocs(s, lambda c, b=b: column(c, b)) for b in BASELINES}
        for det, fs in CANDIDATES:
            opts = {"components": args.gmm_components} if det == "gmm" else {}
            state = D.lookup(det)(fs).fit(s["in_fit"], k, **opts)
            res[f"{det}[{fs}]"] = aurocs(s, lambda c, st=state: st.score(c).double().numpy())
        val = {key: cols for key, cols in s.items() if key.startswith("val:")}
        chosen = D.choose(s["in_fit"], s["in_val"], val, k).main
        res[f"choose -> {chosen.name}[{chosen.features}]"] = aurocs(
            s, lambda c, st=chosen: st.score(c).double().numpy())
        results[name] = res
    print_tables(results)
    print(f"\n({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU threads)")
    return 0


def print_tables(results: dict[str, dict[str, dict[str, float]]]) -> None:
    for part, title in (("val", "VALIDATION (choices)"), ("test", "REPORT (test splits, textures32 second half)")):
        print(f"\n### {title}: AUROC, in-distribution positive\n")
        for name, res in results.items():
            keys = [k for k in next(iter(res.values())) if k.startswith(part + ":")]
            print(f"**{name}**\n")
            print("| score | " + " | ".join(k.split(":")[1] for k in keys) + " | min |")
            print("|---|" + "---|" * (len(keys) + 1))
            for method, r in res.items():
                vals = [r[k] for k in keys]
                print(f"| {method} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {min(vals):.3f} |")
            print()
    methods = [m for m in next(iter(results.values())) if "[" in m and not m.startswith("choose")]
    score = {m: float(np.mean([min(v for k, v in res[m].items() if k.startswith("val:")) for res in results.values()]))
             for m in methods}
    best = max(score, key=score.__getitem__)
    print("### Choice on validation: mean over checkpoints of the worst-case validation AUROC\n")
    print("| detector | mean min val AUROC |\n|---|---|")
    for m in sorted(score, key=score.__getitem__, reverse=True):
        print(f"| {m} | {score[m]:.3f} |")
    print(f"\nwinner: **{best}**")


if __name__ == "__main__":
    sys.exit(main())
