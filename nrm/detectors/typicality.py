"""Two-sided typicality per predicted class, on NRM statistics (column ``det_typicality``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.statistics import StatisticsDetector, per_class


def typicality(f: Tensor, pred: Tensor, median: Tensor, mad: Tensor) -> Tensor:
    """Two-sided typicality (after Nalisnick et al. 2019): s = -sum_j |f_j - med[y*, j]| / MAD[y*, j].

    f (N, D), pred (N,) = y*, median and mad (K, D) per class. Both tails count as atypical."""
    return -((f - median[pred]).abs() / mad[pred]).sum(dim=1)


def fit_typicality(f: Tensor, pred: Tensor, n_classes: int) -> dict[str, Tensor]:
    """Per-class median and median absolute deviation of each feature (MAD floored at 1e-6 of the
    pooled MAD, so a constant feature does not divide by zero)."""
    median = per_class(f, pred, n_classes, lambda a: a.median(dim=0).values)
    mad = per_class(f, pred, n_classes, lambda a: (a - a.median(dim=0).values).abs().median(dim=0).values)
    floor = (f - f.median(dim=0).values).abs().median(dim=0).values.clamp_min(1e-12) * 1e-6
    return {"median": median, "mad": torch.maximum(mad, floor)}


@dataclass(eq=False)
class Typicality(StatisticsDetector):
    """Two-sided typicality per predicted class (after Nalisnick et al. 2019, "Detecting
    Out-of-Distribution Inputs to Deep Generative Models Using Typicality"): :func:`typicality`,

        s = -sum_j |f_j - med[y*, j]| / MAD[y*, j]

    with the median and MAD of :func:`fit_typicality`."""

    name: ClassVar[str] = "typicality"
    keys: ClassVar[tuple[str, ...]] = ("median", "mad")
    median: Tensor | None = None  # (K, D)
    mad: Tensor | None = None  # (K, D)

    def _fit_features(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        return fit_typicality(f, pred, n_classes)

    def _score_features(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        return typicality(f, pred, fitted["median"], fitted["mad"])
