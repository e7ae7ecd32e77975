"""jobs.drift: the statistics pinned to known values, the binned KS against scipy's own, the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kstest

from jobs.drift import (
    DriftError,
    Limits,
    band,
    bin_counts,
    flagged_p,
    ks_critical,
    ks_distance,
    ks_p,
    measure,
    merge_counts,
    of_manifest,
)
from nrm.config import Threshold
from nrm.reference import Reference, describe


def test_flagged_p_is_the_binomial_upper_tail_7_of_100_at_5_percent() -> None:
    tail = 1 - sum(math.comb(100, k) * 0.05**k * 0.95 ** (100 - k) for k in range(7))
    assert flagged_p(7, 100, 0.05) == pytest.approx(tail, rel=1e-9) == pytest.approx(0.2340, abs=1e-4)


def test_ks_p_at_masseys_5_percent_critical_value_for_10_rows() -> None:
    assert ks_p(0.40925, 10) == pytest.approx(0.05, abs=2e-4)  # Massey (1951), table 1: n = 10, alpha 0.05


def test_ks_critical_for_many_rows_is_kolmogorovs_1_358_over_sqrt_n() -> None:
    assert ks_critical(10_000, 0.05) == pytest.approx(1.3581 / 100, rel=0.01)


def test_bin_counts_put_each_score_at_or_below_its_quantile() -> None:
    assert bin_counts(np.array([-5.0, 0.0, 0.5, 1.0, 2.0, 9.0]), (0.0, 1.0, 2.0)) == [2, 2, 1, 1]


def test_merge_counts_sums_parts_and_is_none_when_a_part_has_none() -> None:
    assert merge_counts([[1, 2], [3, 4]]) == [4, 6]
    assert merge_counts([[1, 2], None]) is None


def test_binned_ks_is_within_a_quantile_step_of_scipys_kstest() -> None:
    rng = np.random.default_rng(0)
    ref = describe(rng.normal(size=20_000), value=-1.645)
    night = rng.normal(0.3, 1.2, size=3_000)
    exact = kstest(night, ref.cdf).statistic
    binned = ks_distance(bin_counts(night, ref.quantiles), len(ref.quantiles))
    assert binned <= exact + 1e-12 and exact - binned < 1 / (len(ref.quantiles) - 1)


def test_ks_distance_refuses_counts_of_another_reference() -> None:
    with pytest.raises(DriftError, match="expected 4 counts"):
        ks_distance([1, 2], 3)


def test_band_holds_the_expected_rate_and_narrows_with_rows() -> None:
    lo, hi = band(0.05, 1_000)
    lo2, hi2 = band(0.05, 100_000)
    assert lo < 0.05 < hi and lo < lo2 < 0.05 < hi2 < hi


# ---------------------------------------------------------------------------- verdicts
REF = Reference(5_000, 0.05, tuple(np.linspace(-3.0, 3.0, 201)))  # a uniform reference on [-3, 3]
TH = Threshold("det_x", -2.7, 0.95, REF)


def uniform_counts(n: int, lo: float = -3.0, hi: float = 3.0) -> list[int]:
    return bin_counts(np.linspace(lo, hi, n), REF.quantiles)


def test_a_night_like_the_reference_is_no_drift() -> None:
    d = measure(TH, ok=2_000, errors=0, flagged=100, counts=uniform_counts(2_000))
    assert d.verdict(Limits()) == "no drift" and d.ks is not None and d.ks < 0.01


def test_a_small_significant_excess_is_a_shift_not_an_alert() -> None:
    d = measure(TH, ok=10_000, errors=0, flagged=700, counts=uniform_counts(10_000))  # 7% against 5%: p ~ 1e-18
    assert d.flagged_p is not None and d.flagged_p < 1e-6
    assert d.verdict(Limits()) == "shift"


def test_many_flagged_rows_are_drift_and_the_line_says_why() -> None:
    d = measure(TH, ok=2_400, errors=12, flagged=554, counts=uniform_counts(2_400, -3.0, 2.0))
    assert d.verdict(Limits()) == "drift"
    assert d.line(Limits()).startswith("flagged 23.1% of 2400 ok rows (expected 5.0%, p < 1e-6), KS 0.166 (p < 1e-6)"
                                       "; 12 error rows: drift (flagged 23.1% > 10.0%; KS 0.166 > 0.1)")  # exact D: 1/6


def test_an_excess_chance_explains_is_not_drift() -> None:
    d = measure(TH, ok=20, errors=0, flagged=3, counts=uniform_counts(20))  # 15% of 20 rows: p = 0.075
    assert d.verdict(Limits()) == "no drift"


def test_the_verdict_follows_the_users_limits() -> None:
    d = measure(TH, ok=10_000, errors=0, flagged=700, counts=uniform_counts(10_000))
    assert d.verdict(Limits(max_flagged=0.06)) == "drift"


def test_error_rows_are_counted_apart_and_alert_only_past_max_errors() -> None:
    d = measure(TH, ok=900, errors=100, flagged=45, counts=uniform_counts(900))
    assert d.flagged_fraction == 0.05 and d.error_fraction == 0.1
    assert d.verdict(Limits()) == "no drift" and d.verdict(Limits(max_errors=0.05)) == "drift"


def test_without_a_reference_the_expected_rate_is_one_minus_tpr_and_there_is_no_distance() -> None:
    d = measure(Threshold("det_x", -2.7, 0.9), ok=100, errors=0, flagged=10, counts=None)
    assert d.expected == pytest.approx(0.1) and d.ks is None and "KS n/a" in d.line(Limits())


def test_limits_refuse_a_fraction_outside_0_1() -> None:
    with pytest.raises(DriftError, match="--max-drift 1.5"):
        Limits(max_drift=1.5)


def test_drift_round_trips_through_the_manifest() -> None:
    d = measure(TH, ok=2_000, errors=3, flagged=100, counts=uniform_counts(2_000))
    doc = d.to_json(Limits())
    assert doc["verdict"] == "no drift" and doc["limits"]["max_flagged"] == pytest.approx(0.1)
    assert of_manifest({"drift": doc}) == d


def test_a_manifest_without_drift_is_read_from_its_counts() -> None:
    d = of_manifest({"threshold": {"score": "s", "value": 0.0, "tpr": 0.95}, "rows": {"ok": 100, "error": 2},
                     "flagged_ood": 30})
    assert (d.ok, d.errors, d.flagged, d.ks) == (100, 2, 30, None) and d.verdict(Limits()) == "drift"
