"""The in-distribution reference of a checkpoint's threshold score, recorded when the threshold is fitted.

The threshold keeps a fraction ``tpr`` of held-out in-distribution rows. Those same rows also say how
the threshold score is distributed on in-distribution data; a scheduled audit compares each night's
scores with that (jobs/drift.py). Recorded here, in config.json's ``threshold.reference``:

* ``rows``: how many held-out rows set the threshold;
* ``expected_rate``: the fraction of them the threshold flags (score < value), about 1 - tpr;
* ``quantiles``: the score at probabilities 0, 1/(Q-1), ..., 1 (``QUANTILES`` = Q points, linear
  interpolation between order statistics, numpy's default). Their piecewise-linear interpolation
  is the reference CDF; between two recorded points it is off by at most 1/(Q-1) in probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

QUANTILES = 201  # every 0.5% of probability: a KS distance read on them is within 0.005 of the exact one


@dataclass(frozen=True)
class Reference:
    """How the threshold score is distributed on the held-out in-distribution rows that set the threshold."""

    rows: int
    expected_rate: float  # fraction of those rows flagged OOD by the threshold
    quantiles: tuple[float, ...]  # the score at probabilities linspace(0, 1, len(quantiles)), non-decreasing

    def __post_init__(self) -> None:
        q = np.asarray(self.quantiles, dtype=np.float64)
        if self.rows < 1 or not 0.0 <= self.expected_rate <= 1.0:
            raise ValueError(f"reference: rows must be >= 1 and expected_rate in [0, 1], got rows {self.rows}, "
                             f"expected_rate {self.expected_rate}")
        if q.ndim != 1 or q.size < 2 or not np.isfinite(q).all() or (np.diff(q) < 0).any():
            raise ValueError(f"reference: quantiles must be at least 2 finite, non-decreasing numbers, got "
                             f"{len(self.quantiles)} value(s) {list(self.quantiles[:4])}...")

    @property
    def probabilities(self) -> np.ndarray:
        """The probability of each recorded quantile: linspace(0, 1, Q)."""
        return np.linspace(0.0, 1.0, len(self.quantiles))

    def cdf(self, x: Any) -> np.ndarray:
        """The reference CDF at ``x``: the recorded quantiles interpolated linearly (0 below the
        smallest, 1 above the largest)."""
        return np.interp(np.asarray(x, dtype=np.float64), np.asarray(self.quantiles), self.probabilities,
                         left=0.0, right=1.0)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "expected_rate": self.expected_rate, "quantiles": list(self.quantiles)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Reference:
        return cls(int(d["rows"]), float(d["expected_rate"]), tuple(float(v) for v in d["quantiles"]))


def describe(scores: Sequence[float] | np.ndarray | Any, value: float, n: int = QUANTILES) -> Reference:
    """The reference of in-distribution ``scores`` (1-D; a torch tensor is converted) under the
    threshold ``value`` (a row is flagged when its score < value)."""
    s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all():
        raise ValueError(f"reference: expected a non-empty 1-D array of finite scores, got shape {s.shape}")
    if not math.isfinite(value):
        raise ValueError(f"reference: the threshold value must be finite, got {value}")
    q = np.quantile(s, np.linspace(0.0, 1.0, n))
    return Reference(int(s.size), float(np.mean(s < value)), tuple(float(v) for v in np.maximum.accumulate(q)))
