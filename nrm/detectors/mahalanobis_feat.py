"""Lee et al. (2018) on the penultimate features, with the true training labels (column ``mahalanobis_feat``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.base import DetectorError, Head, Rows
from nrm.detectors.baseline import BaselineDetector, finite, matrix, same_rows


def mahalanobis_penultimate(f: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """Minimum class-conditional Mahalanobis distance, negated (Lee et al. 2018, "A Simple Unified
    Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS):

        s(f) = -min_k (f - mu_k)^T Sigma^-1 (f - mu_k)

    f (N, F), means mu (K, F), precision Sigma^-1 (F, F) -> s (N,). Higher = in-distribution.
    Without the paper's input preprocessing and layer ensemble (OpenOOD's post-hoc variant)."""
    best = torch.full((f.shape[0],), math.inf, dtype=f.dtype, device=f.device)
    for mu in means:  # K passes of (N, F) instead of one (N, K, F) tensor
        d = f - mu  # (N, F)
        best = torch.minimum(best, ((d @ precision) * d).sum(dim=1))
    return -best


def check_labels(labels: Any, n_classes: int, features: Tensor) -> Tensor:
    """``labels`` as int64 (N,) in 0..n_classes-1, every class present; a DetectorError otherwise."""
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise DetectorError(f"labels must be an integer tensor of shape (N,), got {shape}")
    same_rows(features, "features", labels, "labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise DetectorError(f"labels must lie in 0..{n_classes - 1} (n_classes = {n_classes}), got values in "
                            f"{int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels.long(), minlength=n_classes)
    if empty := torch.nonzero(counts == 0).flatten().tolist():
        raise DetectorError(f"classes {empty} have no training samples; every class 0..{n_classes - 1} needs one")
    return labels.long()


@dataclass(eq=False)
class MahalanobisFeat(BaselineDetector):
    """Lee et al. (2018) on the penultimate features: class means over the TRUE training labels and one
    shared (tied) covariance, score :func:`mahalanobis_penultimate`; higher = in-distribution.

    Sigma = 1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T and Sigma^-1 its pseudo-inverse (sklearn's
    EmpiricalCovariance, as Lee et al. and OpenOOD use)."""

    means: Tensor | None = None  # (K, F)
    precision: Tensor | None = None  # (F, F)
    name: ClassVar[str] = "mahalanobis_feat"
    keys: ClassVar[tuple[str, ...]] = ("means", "precision")

    def fit_inputs(self) -> set[str]:
        return {"penultimate", "label"}

    def _fit(self, rows: dict[str, Tensor], head: Head, **options: Any) -> dict[str, Tensor]:
        f = finite(matrix(rows["penultimate"], "features"), "features").double()
        y = check_labels(rows["label"], head.n_classes, f)
        counts = torch.bincount(y, minlength=head.n_classes)
        sums = torch.zeros(head.n_classes, f.shape[1], dtype=f.dtype).index_add_(0, y, f)
        means = sums / counts.to(f)[:, None]  # (K, F)
        centred = f - means[y]  # (N, F)
        cov = centred.T @ centred / f.shape[0]  # (F, F)
        return {"means": means, "precision": torch.linalg.pinv(cov, hermitian=True)}

    def score(self, cols: Rows) -> Tensor:
        """s (N,) float64 = -min_k Mahalanobis distance; higher = in-distribution."""
        t = self.tensors()
        f = matrix(cols["penultimate"], "features", t["means"].shape[1]).to(t["means"])
        return mahalanobis_penultimate(f, t["means"], t["precision"])
