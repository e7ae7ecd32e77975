"""Drift of one scoring run against the checkpoint's in-distribution reference (nrm.reference).

Over a run's ok rows (error rows are counted apart and never as in-distribution):

* **flagged fraction** k / n against the expected rate e (the fraction of the held-out
  in-distribution rows the threshold flags): the exact one-sided binomial test
  ``scipy.stats.binomtest(k, n, e, alternative="greater")``: could chance alone flag this many?
* **distance**: the one-sample Kolmogorov-Smirnov statistic D = sup_t |F_run(t) - F_ref(t)| between
  the run's threshold scores and the reference CDF, with its p-value from ``scipy.stats.kstwo``
  (the exact distribution of D for n rows). KS rather than PSI: D is free of the score's scale (a
  Mahalanobis distance and a log-likelihood read alike), needs no binning choice, lies in [0, 1], and
  reads in the flagged fraction's own unit: the largest change, over every threshold one could have
  fitted, in the fraction of rows scored below it. PSI needs bins and a log ratio that no threshold
  reading explains, and its usual 0.1 / 0.25 rules of thumb come from credit scoring with 10 bins.
  D is read at the reference's recorded quantiles (``bin_counts``: the write tasks count each part's
  scores per quantile bin, so the driver reads no row back): within 1/(Q-1) = 0.005 of the exact D.

**Verdict.** The expected rate comes from held-out *training* rows; a clean test night is flagged a
little more often (generalisation gap, re-encoded images), and with thousands of rows a test at any
usual level calls that significant. So a test alone never raises an alert: ``drift`` needs an effect
above a threshold the user sets *and* a p-value below ``alpha``:

* flagged fraction > ``max_flagged`` (default: twice the expected rate) with binomial p < alpha, or
* D > ``max_drift`` (default 0.1) with KS p < alpha, or
* error rows > ``max_errors`` of all rows (default: not checked).

A significant change below those thresholds is ``shift`` (reported, no alert); otherwise ``no drift``.
docs/results.md, "Scheduled audits", measures how often clean nights raise an alert with the defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

DEFAULT_MAX_DRIFT = 0.1
DEFAULT_ALPHA = 1e-3
FLAGGED_FACTOR = 2.0  # default max_flagged = FLAGGED_FACTOR x expected rate


class DriftError(ValueError):
    """Limits or statistics that cannot be used; the message names the value and what was expected."""


# ---------------------------------------------------------------------------- counting (write tasks)
def bin_counts(scores: np.ndarray, quantiles: tuple[float, ...] | np.ndarray) -> list[int]:
    """How many ``scores`` fall in each bin of the reference quantiles q_0 <= ... <= q_{Q-1}: bin i holds
    q_{i-1} < s <= q_i (q_{-1} = -inf, q_Q = +inf), so the running sum at i counts s <= q_i. Q + 1 ints."""
    q = np.asarray(quantiles, dtype=np.float64)
    idx = np.searchsorted(q, np.asarray(scores, dtype=np.float64), side="left")
    return [int(c) for c in np.bincount(idx, minlength=len(q) + 1)]


def merge_counts(per_part: list[list[int] | None]) -> list[int] | None:
    """The run's bin counts: the parts' summed; None when any part has none (written without a reference)."""
    if not per_part or any(c is None for c in per_part):
        return None
    return [int(v) for v in np.sum(np.asarray(per_part, dtype=np.int64), axis=0)]


# ---------------------------------------------------------------------------- statistics
def flagged_p(flagged: int, ok: int, expected: float) -> float:
    """P(at least ``flagged`` of ``ok`` in-distribution rows flagged) at rate ``expected``: one-sided exact
    binomial test (scipy.stats.binomtest)."""
    from scipy.stats import binomtest

    return float(binomtest(flagged, ok, expected, alternative="greater").pvalue)


def ks_distance(counts: list[int], n_quantiles: int) -> float:
    """D = max_i |F_run(q_i) - p_i| over the reference quantiles q_i at probabilities p_i = i / (Q - 1),
    from the run's ``bin_counts`` (Q + 1 bins); 0 <= D <= 1."""
    c = np.asarray(counts, dtype=np.float64)
    if len(c) != n_quantiles + 1 or c.sum() <= 0:
        raise DriftError(f"bin counts: expected {n_quantiles + 1} counts with a positive sum, got {len(c)} "
                         f"summing to {c.sum():g}")
    f_run = np.cumsum(c)[:-1] / c.sum()
    return float(np.max(np.abs(f_run - np.linspace(0.0, 1.0, n_quantiles))))


def ks_p(distance: float, n: int) -> float:
    """P(D >= ``distance``) for ``n`` rows drawn from the reference: scipy.stats.kstwo's survival function."""
    from scipy.stats import kstwo

    return float(kstwo.sf(distance, n))


# ---------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Limits:
    """When a run is ``drift``: see the module docstring. ``max_flagged`` None: FLAGGED_FACTOR x expected."""

    max_flagged: float | None = None
    max_drift: float = DEFAULT_MAX_DRIFT
    alpha: float = DEFAULT_ALPHA
    max_errors: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_flagged", "max_drift", "max_errors"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise DriftError(f"--{name.replace('_', '-')} {v}: expected a fraction in [0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise DriftError(f"--alpha {self.alpha}: expected a probability in (0, 1)")


@dataclass(frozen=True)
class Drift:
    """A run's drift statistics (the manifest's ``drift``); the verdict is re-read under any Limits."""

    score: str | None  # the threshold score column
    ok: int
    errors: int
    flagged: int
    expected: float | None  # the expected flagged fraction of in-distribution rows; None: no threshold
    reference_rows: int | None  # held-out rows behind the reference; None: the checkpoint records none
    flagged_p: float | None
    ks: float | None  # None: no reference in the checkpoint, or parts counted without one
    ks_p: float | None

    @property
    def flagged_fraction(self) -> float | None:
        return self.flagged / self.ok if self.ok else None

    @property
    def error_fraction(self) -> float | None:
        total = self.ok + self.errors
        return self.errors / total if total else None

    def alerts(self, limits: Limits) -> list[str]:
        """Why the run is ``drift`` under ``limits`` (empty: it is not)."""
        out = []
        f, cap = self.flagged_fraction, self.max_flagged(limits)
        if f is not None and cap is not None and f > cap and self.flagged_p is not None and self.flagged_p < limits.alpha:
            out.append(f"flagged {f:.1%} > {cap:.1%}")
        if self.ks is not None and self.ks_p is not None and self.ks > limits.max_drift and self.ks_p < limits.alpha:
            out.append(f"KS {self.ks:.3f} > {limits.max_drift:g}")
        e = self.error_fraction
        if limits.max_errors is not None and e is not None and e > limits.max_errors:
            out.append(f"errors {e:.1%} > {limits.max_errors:.1%}")
        return out

    def max_flagged(self, limits: Limits) -> float | None:
        if limits.max_flagged is not None:
            return limits.max_flagged
        return None if self.expected is None else min(1.0, FLAGGED_FACTOR * self.expected)

    def verdict(self, limits: Limits) -> str:
        """``drift`` (an alert), ``shift`` (beyond chance, below the limits), ``no drift``, or ``no ok rows``."""
        if self.alerts(limits):
            return "drift"
        if not self.ok:
            return "no ok rows"
        if any(p is not None and p < limits.alpha for p in (self.flagged_p, self.ks_p)):
            return "shift"
        return "no drift"

    def line(self, limits: Limits) -> str:
        """One line, e.g. 'flagged 23.1% of 2400 ok rows (expected 5.0%, p < 1e-6), KS 0.214 (p < 1e-6);
        12 error rows: drift (flagged 23.1% > 10.0%)'."""
        f = self.flagged_fraction
        if f is None:
            head = "no ok rows"
        else:
            exp = f"expected {self.expected:.1%}, p {_p(self.flagged_p)}" if self.expected is not None else "no threshold"
            head = f"flagged {f:.1%} of {self.ok} ok rows ({exp})"
        ks = f", KS {self.ks:.3f} (p {_p(self.ks_p)})" if self.ks is not None else ", KS n/a (no reference)"
        errors = f"; {self.errors} error rows" if self.errors else ""
        why = self.alerts(limits)
        return f"{head}{ks}{errors}: {self.verdict(limits)}" + (f" ({'; '.join(why)})" if why else "")

    def to_json(self, limits: Limits) -> dict[str, Any]:
        return {**asdict(self), "flagged_fraction": self.flagged_fraction,
                "limits": asdict(replace(limits, max_flagged=self.max_flagged(limits))),
                "verdict": self.verdict(limits), "line": self.line(limits)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Drift:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 1e-6" if p < 1e-6 else f"= {p:.2g}"


def measure(threshold: Any, ok: int, errors: int, flagged: int, counts: list[int] | None) -> Drift:
    """A run's Drift from its counts: ``threshold`` is the checkpoint's nrm.config.Threshold (or None),
    ``counts`` the run's summed ``bin_counts`` over its reference's quantiles (None: not counted)."""
    ref = getattr(threshold, "reference", None)
    expected = ref.expected_rate if ref is not None else (1.0 - threshold.tpr if threshold is not None else None)
    p = flagged_p(flagged, ok, expected) if ok and expected is not None else None
    ks = kp = None
    if ref is not None and counts is not None and ok:
        ks = ks_distance(counts, len(ref.quantiles))
        kp = ks_p(ks, ok)
    return Drift(threshold.score if threshold is not None else None, ok, errors, flagged, expected,
                 ref.rows if ref is not None else None, p, ks, kp)


def of_manifest(m: dict[str, Any]) -> Drift:
    """The Drift a committed manifest records; for a run committed before drift was recorded, the flagged
    fraction against 1 - tpr of its threshold (no distance)."""
    if isinstance(m.get("drift"), dict):
        return Drift.from_json(m["drift"])
    th, rows = m.get("threshold"), m.get("rows", {})
    ok, flagged = int(rows.get("ok", 0)), int(m.get("flagged_ood", 0))
    expected = 1.0 - float(th.get("tpr", 0.95)) if th else None
    p = flagged_p(flagged, ok, expected) if ok and expected is not None else None
    return Drift(th.get("score") if th else None, ok, int(rows.get("error", 0)), flagged, expected, None, p, None, None)


def band(expected: float, n: int, alpha: float = DEFAULT_ALPHA) -> tuple[float, float]:
    """The flagged fractions of ``n`` in-distribution rows that a two-sided test at ``alpha`` would not
    call unusual: scipy.stats.binom's central 1 - alpha interval around ``expected``, as fractions."""
    from scipy.stats import binom

    lo, hi = binom.interval(1.0 - alpha, n, expected)
    return float(lo) / n, float(hi) / n


def ks_critical(n: int, alpha: float = DEFAULT_ALPHA) -> float:
    """The KS distance that ``n`` in-distribution rows exceed with probability ``alpha`` (scipy.stats.kstwo)."""
    from scipy.stats import kstwo

    return float(kstwo.isf(alpha, n)) if n > 0 else math.nan
