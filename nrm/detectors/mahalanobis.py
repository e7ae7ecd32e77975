"""Class-conditional Gaussian with a shared covariance at the predicted class, on NRM statistics
(column ``det_mahalanobis``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.statistics import StatisticsDetector, per_class

# From this many features on, the quadratic form is taken in float32, much faster than float64 (a
# ResNet-56 has 4,064 gate features); tests hold it to the float64 formula at 1e-4.
FAST_DIMS = 512


def mahalanobis(f: Tensor, pred: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """Class-conditional Gaussian with shared covariance (Lee et al. 2018), at the predicted class:
    s = -(f - mu[y*])^T Sigma^-1 (f - mu[y*]).  f (N, D), means (K, D), precision (D, D)."""
    d = f - means[pred]  # (N, D)
    return -((d @ precision) * d).sum(dim=1)


def fit_mahalanobis(f: Tensor, pred: Tensor, n_classes: int) -> dict[str, Tensor]:
    """Class means and the inverse of the pooled within-class covariance (ridge 1e-6 of its trace / D)."""
    means = per_class(f, pred, n_classes, lambda a: a.mean(dim=0), min_count=1)  # (K, D)
    centred = f - means[pred]
    cov = centred.T @ centred / max(1, len(f) - 1)  # (D, D)
    ridge = 1e-6 * float(cov.trace()) / cov.shape[0] + 1e-12
    precision = torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))
    return {"means": means, "precision": precision}


def symmetric_slabs(p: Tensor, block: int = 512) -> list[Tensor]:
    """Symmetric P (D, D) as its upper block rows P[a:b, a:] (blocks of ``block`` rows), the
    off-diagonal blocks doubled, in float32: what :func:`quadratic_form` reads."""
    slabs = []
    for a in range(0, p.shape[0], block):
        b = min(a + block, p.shape[0])
        slab = p[a:b, a:].clone()
        slab[:, b - a :] *= 2
        slabs.append(slab.float().contiguous())
    return slabs


def quadratic_form(d: Tensor, slabs: list[Tensor]) -> Tensor:
    """d^T P d (N,) for d (N, D) and symmetric P given as :func:`symmetric_slabs`: each pair of
    blocks once, (B + 1) / 2B of the full D x D product's flops with B blocks."""
    out = d.new_zeros(len(d))
    a = 0
    for slab in slabs:
        b = a + slab.shape[0]
        out += ((d[:, a:b] @ slab) * d[:, a:]).sum(dim=1)
        a = b
    return out


@dataclass(eq=False)
class Mahalanobis(StatisticsDetector):
    """Class-conditional Gaussian with a shared covariance at the predicted class (Lee et al. 2018, "A
    Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"):
    :func:`mahalanobis`,

        s = -(f - mu[y*])^T Sigma^-1 (f - mu[y*])

    with the means and precision of :func:`fit_mahalanobis`. From ``FAST_DIMS`` features on, the
    difference is taken in float64 and the quadratic form in float32 (:func:`quadratic_form`)."""

    means: Tensor | None = None  # (K, D)
    precision: Tensor | None = None  # (D, D)
    name: ClassVar[str] = "mahalanobis"
    dense: ClassVar[bool] = True
    keys: ClassVar[tuple[str, ...]] = ("means", "precision")

    def _fit_features(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        return fit_mahalanobis(f, pred, n_classes)

    def _score_features(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        if f.shape[1] < FAST_DIMS:
            return mahalanobis(f, pred, fitted["means"], fitted["precision"])
        d = (f - fitted["means"][pred]).float()  # (N, D)
        return -quadratic_form(d, [v for k, v in fitted.items() if k.startswith("slab")])  # in order

    def _derive(self, fitted: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"slab{i}": s for i, s in enumerate(symmetric_slabs(fitted["precision"]))}  # float32 slabs
