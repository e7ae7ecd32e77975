"""Which estimator of log Z(y) separates OOD data best? (issue 2; docs/results.md records the output)

Validation data only: the normaliser is fitted on in-distribution TRAIN images the checkpoint's own
fit did not hold out (first N of the train split), compared on other in-distribution TRAIN images
against OOD sets drawn from TRAIN splits (MNIST / Fashion-MNIST) or the first half of textures32.
No test split is touched.

    python scripts/normaliser_comparison.py --model CKPT --in DIR --ood NAME=DIR [--ood ...]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import nrm
from jobs.datasets import load_labelled
from nrm import metrics
from nrm.fit import NORMALISERS, collect, log_partition
from nrm.scores import loglik_bound


def textures_half(x: np.ndarray, y: np.ndarray, first: bool) -> tuple[np.ndarray, np.ndarray]:
    """The fixed validation (first) / report (second) halves of a set, by a seeded permutation."""
    order = np.random.default_rng(0).permutation(len(x))
    half = order[: len(x) // 2] if first else order[len(x) // 2 :]
    return x[half], y[half]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--in", dest="ind", required=True, help="in-distribution TRAIN split")
    ap.add_argument("--ood", action="append", default=[], help="NAME=DIR (a TRAIN split, or textures32: first half)")
    ap.add_argument("--fit", type=int, default=10000, help="train images to fit log Z on")
    ap.add_argument("--val", type=int, default=3000, help="further train images as in-distribution validation")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = nrm.load(args.model)
    shape = model.input_shape
    x, _ = load_labelled(args.ind, shape, limit=args.fit + args.val)
    pre = lambda a: [model.preprocess(torch.from_numpy(a[i : i + 512])) for i in range(0, len(a), 512)]  # noqa: E731
    fit_s, val_s = collect(model, pre(x[: args.fit])), collect(model, pre(x[args.fit :]))
    ood = {}
    for spec in args.ood:
        name, _, uri = spec.partition("=")
        xo, yo = load_labelled(uri, shape, limit=None if "textures" in name else args.val)
        if "textures" in name:
            xo, _ = textures_half(xo, yo, first=True)
        ood[name] = collect(model, pre(xo))
    k = len(model.config.classes)
    sigma2 = model.config.fitted.sigma2
    print(f"model {args.model}: log Z fitted on {args.fit} in-distribution train images; "
          f"AUROC (in-distribution = positive) on {len(val_s['pred'])} held-out train images vs validation OOD sets\n")
    print("| normaliser | score | " + " | ".join(ood) + " | mean |")
    print("|---|---|" + "---|" * (len(ood) + 1))
    for method in NORMALISERS:
        log_z = log_partition(fit_s["latent_prior"], fit_s["pred"], k, method)
        for col in ("latent_loglik", "loglik_bound"):
            def score(s: dict[str, torch.Tensor], col: str = col, log_z: torch.Tensor = log_z) -> np.ndarray:
                ll = s["latent_prior"].double() - log_z[s["pred"]]
                return (ll if col == "latent_loglik" else loglik_bound(s["recon_sq_error"].double(), ll, sigma2)).numpy()

            aurocs = [metrics.auroc(score(val_s), score(o)) for o in ood.values()]
            print(f"| {method} | {col} | " + " | ".join(f"{a:.3f}" for a in aurocs) + f" | {np.mean(aurocs):.3f} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
