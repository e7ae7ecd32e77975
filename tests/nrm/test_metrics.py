"""nrm.metrics against scikit-learn, on random, tied, unbalanced and degenerate scores."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import nrm.metrics
from nrm.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    detection_error,
    fpr_at_tpr,
    group_means,
    ood_metrics,
    orient,
    threshold_at_tpr,
)

TOL = 1e-12


# --------------------------------------------------------------------------- sklearn references


def _labelled(score_in: np.ndarray, score_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.concatenate((np.ones(len(score_in)), np.zeros(len(score_out))))
    return y, np.concatenate((score_in, score_out)).astype(np.float64)


def sk_metrics(score_in: np.ndarray, score_out: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    y, s = _labelled(score_in, score_out)
    fpr_c, tpr_c, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "fpr": float(fpr_c[np.searchsorted(tpr_c, tpr, side="left")]),
        "detection_error": float(np.min(0.5 * (1 - tpr_c) + 0.5 * fpr_c)),
    }


def assert_matches_sklearn(score_in: np.ndarray, score_out: np.ndarray) -> None:
    ref = sk_metrics(score_in, score_out)
    got = ood_metrics(score_in, score_out)
    assert set(got) == {"auroc", "aupr_in", "aupr_out", "fpr95", "detection_error"}
    assert all(type(v) is float for v in got.values())
    assert got["auroc"] == pytest.approx(ref["auroc"], abs=TOL)
    assert got["aupr_in"] == pytest.approx(ref["aupr_in"], abs=TOL)
    assert got["aupr_out"] == pytest.approx(ref["aupr_out"], abs=TOL)
    assert got["fpr95"] == ref["fpr"]  # a ratio of counts: exact
    assert got["detection_error"] == pytest.approx(ref["detection_error"], abs=TOL)
    # the single-metric functions agree with the dict
    assert auroc(score_in, score_out) == got["auroc"]
    assert aupr_in(score_in, score_out) == got["aupr_in"]
    assert aupr_out(score_in, score_out) == got["aupr_out"]
    assert fpr_at_tpr(score_in, score_out) == got["fpr95"]
    assert detection_error(score_in, score_out) == got["detection_error"]


# --------------------------------------------------------------------------- random data vs sklearn

continuous = st.lists(
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=60
)
tied = st.lists(st.integers(min_value=-3, max_value=3), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(score_in=continuous, score_out=continuous)
def test_continuous_scores_match_sklearn(score_in: list[float], score_out: list[float]) -> None:
    assert_matches_sklearn(np.array(score_in), np.array(score_out))


@settings(max_examples=300, deadline=None)
@given(score_in=tied, score_out=tied)
def test_heavily_tied_integer_scores_match_sklearn(score_in: list[int], score_out: list[int]) -> None:
    assert_matches_sklearn(np.array(score_in), np.array(score_out))


@settings(max_examples=200, deadline=None)
@given(
    score_in=tied,
    score_out=tied,
    tpr=st.sampled_from([0.01, 0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]),
)
def test_fpr_at_any_tpr_matches_first_roc_point_reaching_it(
    score_in: list[int], score_out: list[int], tpr: float
) -> None:
    s_in, s_out = np.array(score_in), np.array(score_out)
    assert fpr_at_tpr(s_in, s_out, tpr) == sk_metrics(s_in, s_out, tpr)["fpr"]
    # ... and it is the OOD fraction at or above the fitted threshold
    v = threshold_at_tpr(s_in, tpr)
    assert fpr_at_tpr(s_in, s_out, tpr) == np.mean(s_out >= v)


@pytest.mark.parametrize(("n_in", "n_out"), [(1000, 1000), (2000, 37), (25, 3000), (1, 500), (500, 1)])
@pytest.mark.parametrize("kind", ["gaussian", "rounded", "few_levels"])
def test_seeded_unbalanced_samples_match_sklearn(n_in: int, n_out: int, kind: str) -> None:
    rng = np.random.default_rng(1234 + n_in + 7 * n_out)
    s_in = rng.normal(1.0, 1.0, n_in)
    s_out = rng.normal(0.0, 1.5, n_out)
    if kind == "rounded":
        s_in, s_out = np.round(s_in, 1), np.round(s_out, 1)
    elif kind == "few_levels":
        s_in, s_out = np.floor(s_in), np.floor(s_out)
    assert_matches_sklearn(s_in, s_out)


# --------------------------------------------------------------------------- degenerate cases


def test_perfect_separation() -> None:
    s_in, s_out = np.linspace(1.0, 2.0, 50), np.linspace(-2.0, 0.5, 80)
    m = ood_metrics(s_in, s_out)
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "detection_error": 0.0}


def test_reversed_separation() -> None:
    s_in, s_out = np.linspace(-2.0, 0.5, 50), np.linspace(1.0, 2.0, 80)
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == 0.0
    assert m["fpr95"] == 1.0
    assert m["detection_error"] == 0.5  # no threshold beats keeping nothing
    assert m["aupr_in"] == pytest.approx(sk_metrics(s_in, s_out)["aupr_in"], abs=TOL)


def test_all_scores_tied_is_chance() -> None:
    m = ood_metrics(np.zeros(30), np.zeros(10))
    assert m["auroc"] == 0.5
    assert m["aupr_in"] == pytest.approx(30 / 40)
    assert m["aupr_out"] == pytest.approx(10 / 40)
    assert m["fpr95"] == 1.0
    assert m["detection_error"] == 0.5


def test_ties_count_one_half() -> None:
    # pairs (in, out): 2>1, 2>0, 1=1 (1/2), 1>0 -> 3.5 / 4
    assert auroc([2.0, 1.0], [1.0, 0.0]) == 0.875


def test_orient_flips_scores_where_lower_is_in_distribution() -> None:
    energy_in, energy_out = np.array([-5.0, -4.0, -6.0]), np.array([-1.0, 0.0])
    assert auroc(energy_in, energy_out) == 0.0
    assert auroc(orient(energy_in, higher_is_in=False), orient(energy_out, higher_is_in=False)) == 1.0
    np.testing.assert_array_equal(orient([1, 2], higher_is_in=True), np.array([1.0, 2.0]))
    assert orient([1, 2], higher_is_in=True).dtype == np.float64


# --------------------------------------------------------------------------- threshold_at_tpr


def test_threshold_at_tpr_keeps_exactly_95_percent_of_1_to_100() -> None:
    scores = np.arange(1, 101, dtype=float)[::-1].copy()
    v = threshold_at_tpr(scores, 0.95)
    assert v == 6.0  # 6..100 are 95 values
    assert np.count_nonzero(scores >= v) == 95
    assert np.count_nonzero(scores >= 7.0) == 94  # the next score up keeps too few


def test_threshold_at_tpr_rounds_the_kept_count_up() -> None:
    scores = np.arange(10, dtype=float)  # 95% of 10 is 9.5 -> keep 10
    assert threshold_at_tpr(scores, 0.95) == 0.0
    assert threshold_at_tpr(scores, 0.9) == 1.0
    assert threshold_at_tpr(scores, 1.0) == 0.0
    assert threshold_at_tpr(scores, 0.05) == 9.0
    assert threshold_at_tpr([3.5], 0.95) == 3.5


def test_threshold_at_tpr_with_ties_keeps_the_whole_tie() -> None:
    scores = np.array([5.0, 4.0, 4.0, 4.0, 1.0])
    assert threshold_at_tpr(scores, 0.4) == 4.0  # keeps 4 of 5 (80%): no larger value keeps 40%
    assert threshold_at_tpr(scores, 0.8) == 4.0
    assert threshold_at_tpr(scores, 0.81) == 1.0


@settings(max_examples=300, deadline=None)
@given(scores=tied, tpr=st.floats(min_value=1e-6, max_value=1.0))
def test_threshold_at_tpr_is_the_largest_that_keeps_enough(scores: list[int], tpr: float) -> None:
    s = np.array(scores, dtype=float)
    v = threshold_at_tpr(s, tpr)
    assert v in s
    assert np.mean(s >= v) >= tpr
    larger = s[s > v]
    if larger.size:
        assert np.mean(s >= larger.min()) < tpr


# --------------------------------------------------------------------------- inputs


def test_accepts_lists_and_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    s_in = torch.tensor([3.0, 2.0, 1.5], requires_grad=True)
    s_out = torch.tensor([0.0, 1.0], dtype=torch.float16)
    assert ood_metrics(s_in, s_out) == ood_metrics([3.0, 2.0, 1.5], [0.0, 1.0])
    assert threshold_at_tpr(s_in, 0.5) == 2.0
    assert orient(s_out, higher_is_in=False).tolist() == [-0.0, -1.0]


@pytest.mark.parametrize(
    ("score_in", "score_out", "match"),
    [
        (np.zeros((3, 2)), np.zeros(3), r"score_in must be a 1-D .* got shape \(3, 2\)"),
        (np.zeros(3), np.zeros((4, 1)), r"score_out must be a 1-D .* got shape \(4, 1\)"),
        (3.0, np.zeros(3), r"score_in must be a 1-D .* got shape \(\)"),
        ([], np.zeros(3), r"score_in must be non-empty, got shape \(0,\)"),
        (np.zeros(3), np.array([]), r"score_out must be non-empty, got shape \(0,\)"),
        ([0.0, np.nan, np.inf, 1.0], [1.0], r"score_in has 2 non-finite entries .* out of 4 .*\(4,\)"),
        ([0.0], [-np.inf], r"score_out has 1 non-finite entries"),
        (["a", "b"], [1.0], r"score_in must be a 1-D array of float scores; could not convert list"),
    ],
)
@pytest.mark.parametrize("metric", [auroc, aupr_in, aupr_out, fpr_at_tpr, detection_error, ood_metrics])
def test_bad_scores_are_named_with_their_shape(score_in, score_out, match, metric) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        metric(score_in, score_out)


def test_bad_threshold_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"score_in_val must be a 1-D .* got shape \(2, 2\)"):
        threshold_at_tpr(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"score_in_val has 1 non-finite"):
        threshold_at_tpr([1.0, np.nan])
    with pytest.raises(ValueError, match=r"score must be non-empty"):
        orient([], higher_is_in=True)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"tpr must lie in \(0, 1\]"):
            threshold_at_tpr([1.0, 2.0], bad)
        with pytest.raises(ValueError, match=r"tpr must lie in \(0, 1\]"):
            fpr_at_tpr([1.0, 2.0], [0.0], bad)


def test_metrics_module_imports_no_heavy_or_edge_dependencies() -> None:
    # load metrics.py on its own (not through nrm/__init__.py, which may rightly import torch)
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('metrics_alone', {nrm.metrics.__file__!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "bad = [m for m in ('ray', 'typer', 'boto3', 'pyarrow', 'sklearn', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_group_means_average_each_column_over_the_sets_of_each_group() -> None:
    per_set = {"a": {"x": 0.9, "y": 0.5}, "b": {"x": 0.7, "y": None}, "c": {"x": 0.2, "y": 0.4}}
    got = group_means(per_set, {"near": ["a", "b"], "far": ["c", "a"]})
    assert got == {"near": {"x": pytest.approx(0.8), "y": None},  # y is missing on b: no partial mean
                   "far": {"x": pytest.approx(0.55), "y": pytest.approx(0.45)}}


def test_group_means_name_an_unknown_set_and_an_empty_group() -> None:
    with pytest.raises(ValueError, match=r"group 'near' names sets \['d'\] that have no metrics"):
        group_means({"a": {"x": 1.0}}, {"near": ["a", "d"]})
    with pytest.raises(ValueError, match=r"group 'far' has no sets"):
        group_means({"a": {"x": 1.0}}, {"far": []})
