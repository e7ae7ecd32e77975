"""Out-of-distribution detection metrics as pure NumPy functions.

Direction convention (every function in this module):

* the **in-distribution** samples are the **positive** class;
* ``score_in`` (scores of in-distribution samples) and ``score_out`` (scores of OOD samples) are
  1-D arrays oriented so that a **higher score means more in-distribution**.

Scores that grow with "OOD-ness" (energy, reconstruction error, negative log-likelihood, ...) must
be flipped by the caller first, e.g. ``orient(recon_error, higher_is_in=False)``. A detector
flags a sample as OOD when its score is *below* a threshold ``v`` and keeps it as in-distribution
when ``score >= v``. With ``n_in = len(score_in)`` and ``n_out = len(score_out)``:

    TPR(v) = #{score_in  >= v} / n_in     (in-distribution kept)
    FPR(v) = #{score_out >= v} / n_out    (OOD accepted as in-distribution)

Inputs may be lists, NumPy arrays or torch tensors (converted with ``.detach().cpu().numpy()``
without importing torch); they must be 1-D, non-empty and finite, otherwise a ``ValueError``
names the argument, its shape and what was expected. Every metric returns a Python ``float``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "aupr_in",
    "aupr_out",
    "auroc",
    "detection_error",
    "fpr_at_tpr",
    "group_means",
    "ood_metrics",
    "orient",
    "threshold_at_tpr",
]

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- input validation


def _as_scores(x: Any, name: str) -> FloatArray:
    """``x`` as a finite, non-empty 1-D float64 array, or a ``ValueError`` that names ``name``."""
    if hasattr(x, "detach"):  # a torch tensor: leave the graph and the device without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a 1-D array of float scores; could not convert {type(x).__name__} "
            f"to float64: {err}"
        ) from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores (shape (n,)), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        raise ValueError(
            f"{name} has {bad} non-finite entries (NaN or +/-inf) out of {arr.size} "
            f"(shape {arr.shape}); expected finite scores"
        )
    return arr


def _as_pair(score_in: Any, score_out: Any) -> tuple[FloatArray, FloatArray]:
    return _as_scores(score_in, "score_in"), _as_scores(score_out, "score_out")


def _check_tpr(tpr: float) -> float:
    tpr = float(tpr)
    if not 0.0 < tpr <= 1.0:  # also rejects NaN
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    return tpr


def orient(score: Any, higher_is_in: bool) -> FloatArray:
    """Return ``score`` as a float64 array oriented so that higher means more in-distribution.

    Validated like every metric input (1-D, non-empty, finite); the flip is

        oriented = score     if higher_is_in      (e.g. max softmax probability, log-likelihood)
        oriented = -score    otherwise            (e.g. energy, reconstruction error)
    """
    arr = _as_scores(score, "score")
    return arr if higher_is_in else -arr


# --------------------------------------------------------------------------- shared building blocks


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks of ``x`` in ascending order; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_group = np.concatenate(([True], xs[1:] != xs[:-1]))
    starts = np.flatnonzero(starts_group)  # 0-based first position of each tie group
    ends = np.append(starts[1:], xs.size)  # 0-based one-past-last position
    mean_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(starts_group) - 1]
    return ranks


def _counts_at_thresholds(pos: FloatArray, neg: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Cumulative counts ``tp_k = #{pos >= t_k}`` and ``fp_k = #{neg >= t_k}`` over the distinct
    values ``t_1 > t_2 > ... > t_K`` of the pooled scores (sklearn's ``_binary_clf_curve``)."""
    scores = np.concatenate((pos, neg))
    labels = np.concatenate((np.ones(pos.size), np.zeros(neg.size)))
    order = np.argsort(scores, kind="mergesort")[::-1]  # descending
    scores, labels = scores[order], labels[order]
    last_of_group = np.append(np.flatnonzero(np.diff(scores)), scores.size - 1)
    tps = np.cumsum(labels)[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps, fps


def _roc(score_in: FloatArray, score_out: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(FPR, TPR) at ``v = +inf`` followed by every distinct pooled score, descending; the same
    points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``."""
    tps, fps = _counts_at_thresholds(score_in, score_out)
    tpr = np.concatenate(([0.0], tps / score_in.size))
    fpr = np.concatenate(([0.0], fps / score_out.size))
    return fpr, tpr


def _average_precision(pos: FloatArray, neg: FloatArray) -> float:
    tps, fps = _counts_at_thresholds(pos, neg)
    precision = tps / (tps + fps)
    recall_step = np.diff(tps, prepend=0.0) / pos.size
    return float(np.sum(recall_step * precision))


# --------------------------------------------------------------------------- metrics


def auroc(score_in: Any, score_out: Any) -> float:
    """Area under the ROC curve, in-distribution positive, ties counted as one half.

    Mann-Whitney U with average ranks ``r`` of the pooled scores (ascending, 1-based):

        AUROC = P(s_in > s_out) + 1/2 P(s_in = s_out)
              = (sum_{i in in} r_i - n_in (n_in + 1) / 2) / (n_in n_out)

    1 means every in-distribution score is above every OOD score, 0.5 chance, 0 reversed.
    Equals ``sklearn.metrics.roc_auc_score(y, s)`` with ``y = 1`` for in-distribution.
    """
    s_in, s_out = _as_pair(score_in, score_out)
    ranks = _average_ranks(np.concatenate((s_in, s_out)))
    n_in, n_out = s_in.size, s_out.size
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def aupr_in(score_in: Any, score_out: Any) -> float:
    """Average precision with in-distribution as the positive class and the score as its score.

    Over the distinct pooled scores ``t_1 > ... > t_K`` (threshold: keep ``score >= t_k``),

        AP = sum_k (R_k - R_{k-1}) P_k,    R_k = tp_k / n_in,  P_k = tp_k / (tp_k + fp_k),  R_0 = 0

    with ``tp_k = #{score_in >= t_k}`` and ``fp_k = #{score_out >= t_k}``: no interpolation, and
    tied scores enter as one step, exactly as ``sklearn.metrics.average_precision_score``.
    Chance level is ``n_in / (n_in + n_out)``.
    """
    s_in, s_out = _as_pair(score_in, score_out)
    return _average_precision(s_in, s_out)


def aupr_out(score_in: Any, score_out: Any) -> float:
    """Average precision with OOD as the positive class and ``-score`` as its score.

        AUPR-Out = AP(positives = -score_out, negatives = -score_in)

    with AP as in :func:`aupr_in`. Chance level is ``n_out / (n_in + n_out)``.
    """
    s_in, s_out = _as_pair(score_in, score_out)
    return _average_precision(-s_out, -s_in)


def threshold_at_tpr(score_in_val: Any, tpr: float = 0.95) -> float:
    """The largest threshold ``v`` that keeps at least a fraction ``tpr`` of the given
    in-distribution scores; a sample is then flagged OOD when ``score < v``.

    With ``s_(1) >= s_(2) >= ... >= s_(n)`` the scores sorted in descending order,

        k = min{ k in 1..n : k / n >= tpr }     (k / n in float64, as sklearn's TPR)
        v = s_(k)

    so ``#{score_in_val >= v} / n >= tpr`` (ties at ``v`` may keep more than ``k``), and any
    larger ``v`` keeps fewer than ``tpr``. Used to fit a checkpoint's default threshold on
    held-out in-distribution scores.
    """
    s = _as_scores(score_in_val, "score_in_val")
    tpr = _check_tpr(tpr)
    n = s.size
    kept_fraction = np.arange(1, n + 1) / n
    k = int(np.searchsorted(kept_fraction, tpr, side="left")) + 1  # <= n since n / n == 1.0 >= tpr
    return float(np.sort(s)[::-1][k - 1])


def fpr_at_tpr(score_in: Any, score_out: Any, tpr: float = 0.95) -> float:
    """False-positive rate (OOD accepted as in-distribution) at the threshold that keeps at least
    ``tpr`` of the in-distribution samples: the "FPR at 95% TPR" of Hendrycks & Gimpel (2017) and
    Liang et al. (2018), where in-distribution is the positive class.

        v   = threshold_at_tpr(score_in, tpr)          (largest v with TPR(v) >= tpr)
        FPR = #{score_out >= v} / n_out

    Equivalently, with ``fpr_c, tpr_c, _ = roc_curve(y, s, drop_intermediate=False)`` (``y = 1``
    for in-distribution), ``FPR = fpr_c[np.searchsorted(tpr_c, tpr, side="left")]``: the first ROC
    point whose TPR reaches the target, without interpolation between points.

    This is NOT OpenOOD v1.5's FPR@95, which takes OOD as the positive class (threshold at 95% of
    OOD detected, fraction of in-distribution rejected); the two generally differ.
    """
    s_in, s_out = _as_pair(score_in, score_out)
    v = threshold_at_tpr(s_in, tpr)
    return float(np.count_nonzero(s_out >= v) / s_out.size)


def detection_error(score_in: Any, score_out: Any) -> float:
    """Minimum misclassification probability with equal priors over all thresholds ``v``:

        DE = min_v  1/2 (1 - TPR(v)) + 1/2 FPR(v)

    over ``v = +inf`` (keep nothing, DE = 1/2) and every distinct pooled score, so ``0 <= DE <= 1/2``.
    """
    s_in, s_out = _as_pair(score_in, score_out)
    fpr, tpr = _roc(s_in, s_out)
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


def ood_metrics(score_in: Any, score_out: Any) -> dict[str, float]:
    """All metrics at once: ``auroc``, ``aupr_in``, ``aupr_out``, ``fpr95`` (``fpr_at_tpr`` at
    0.95, in-distribution positive) and ``detection_error``; same conventions as each function."""
    s_in, s_out = _as_pair(score_in, score_out)
    return {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr_in(s_in, s_out),
        "aupr_out": aupr_out(s_in, s_out),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
        "detection_error": detection_error(s_in, s_out),
    }


def group_means(per_set: Mapping[str, Mapping[str, float | None]],
                groups: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float | None]]:
    """The mean of one metric over the OOD sets of each group (OpenOOD's near-OOD / far-OOD averages).

        mean[g][c] = 1/|g| sum_{s in g} per_set[s][c]

    for every column ``c`` that a set of group ``g`` has, in first-seen order. A column that is
    missing, None or non-finite on any set of the group gets None: a mean over fewer sets than the
    group names would not be comparable with the other columns. A group that is empty or names a set
    absent from ``per_set`` is a ``ValueError`` that names it.
    """
    out: dict[str, dict[str, float | None]] = {}
    for group, names in groups.items():
        if not names:
            raise ValueError(f"group {group!r} has no sets; expected at least one of {sorted(per_set)}")
        unknown = [n for n in names if n not in per_set]
        if unknown:
            raise ValueError(f"group {group!r} names sets {unknown} that have no metrics; known sets: {sorted(per_set)}")
        columns = dict.fromkeys(c for n in names for c in per_set[n])  # ordered union
        means: dict[str, float | None] = {}
        for c in columns:
            vals = [per_set[n].get(c) for n in names]
            ok = all(v is not None and np.isfinite(v) for v in vals)
            means[c] = float(np.mean(np.asarray(vals, dtype=np.float64))) if ok else None
        out[group] = means
    return out
