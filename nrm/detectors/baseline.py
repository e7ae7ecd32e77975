"""The base of the field's post-hoc baselines: detectors on a classifier's penultimate features.

They read what any trained classifier already computes for a sample (score-dict entries):

    penultimate  (N, F)  f, the input of the final linear classifier
    logits       (N, K)  = f W^T + b, with W (K, F) and b (K,) the classifier head (nrm.detectors.Head)

and make a column of their own name, higher = more in-distribution. They are fitted on
in-distribution TRAINING rows (``label``: the true classes, where a method reads them). Fitting
rejects non-finite features; scoring passes a non-finite feature row through as a NaN score (a bad
row never kills a job). Statistics are fitted and scored in float64 where their tensors are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nrm.detectors.base import Detector, DetectorError


@dataclass(eq=False)
class BaselineDetector(Detector):
    """A post-hoc baseline: column ``name``, reading ``penultimate`` (and what a subclass adds)."""

    @property
    def column(self) -> str:
        return self.name

    def inputs(self) -> set[str]:
        return {"penultimate"}


def matrix(x: Any, name: str, width: int | None = None, width_name: str = "F") -> Tensor:
    """``x`` as a 2-D floating tensor (N, width), or a DetectorError quoting its shape."""
    if not isinstance(x, Tensor):
        raise DetectorError(f"{name} must be a torch.Tensor of shape (N, {width_name}), got {type(x).__name__}")
    if x.dim() != 2:
        raise DetectorError(f"{name} must have shape (N, {width_name}), got shape {tuple(x.shape)}")
    if width is not None and x.shape[1] != width:
        raise DetectorError(f"{name} has shape {tuple(x.shape)} but the detector expects {width_name} = {width}, "
                            f"i.e. shape (N, {width})")
    if not x.is_floating_point():
        raise DetectorError(f"{name} must be floating point, got dtype {x.dtype}")
    return x


def finite(x: Tensor, name: str) -> Tensor:
    """``x``, or a DetectorError counting its non-finite entries."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DetectorError(f"{name} (shape {tuple(x.shape)}) has {bad} non-finite entries; fit on finite features")
    return x


def same_rows(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise DetectorError(f"{a_name} has shape {tuple(a.shape)} and {b_name} shape {tuple(b.shape)}: "
                            "expected one row per sample in both")
