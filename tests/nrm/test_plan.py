"""nrm.plan: the columns a run makes, the passes they need and the column that flags OOD."""

from __future__ import annotations

import pytest
import torch
from support import tiny_config

import nrm
from nrm.config import Threshold
from nrm.fit import refit
from nrm.names import unknown_columns
from nrm.plan import ColumnError


def _model() -> nrm.NRM:
    torch.manual_seed(0)
    return nrm.NRM(tiny_config(channels=1, size=8, classes=3)).eval().requires_grad_(False)


def test_a_run_plan_adds_pred_and_the_threshold_column_in_output_order() -> None:
    plan = _model().plan(["energy", "max_softmax"])
    assert plan.columns == ("pred", "max_softmax", "energy", "latent_loglik")  # no threshold: the fallback
    assert plan.render and not plan.unit_stats  # latent_loglik needs the top-down pass


def test_an_exact_plan_makes_only_its_columns_with_the_forward_pass() -> None:
    plan = _model().plan(["energy", "max_softmax"], flag=False)
    assert plan.columns == ("energy", "max_softmax") and not plan.render and not plan.unit_stats


def test_a_gate_detector_column_needs_the_unit_statistics_and_no_rendering() -> None:
    model = _model()
    refit(model, [torch.randn(80, 1, 8, 8)], feature_set="gates_acts")
    plan = model.plan(["max_logit"])
    assert plan.columns == ("pred", "max_logit", "det_mahalanobis") and plan.threshold_column == "det_mahalanobis"
    assert plan.unit_stats and not plan.render


def test_the_full_plan_hands_back_the_detector_inputs_its_passes_make() -> None:
    model = _model()
    assert model.plan().inputs == ("latent_prior_channels",)
    refit(model, [torch.randn(80, 1, 8, 8)], feature_set="gates_acts")
    assert model.plan().inputs == ("latent_prior_channels", "latent_gates", "unit_acts")


def test_a_column_the_model_does_not_make_is_named() -> None:
    with pytest.raises(ColumnError, match=r"unknown score column\(s\) \['det_gmm'\]") as e:
        _model().plan(["max_logit", "det_gmm"])
    assert e.value.unknown == ["det_gmm"] and "latent_loglik" in e.value.known


def test_flag_without_a_threshold_ranks_by_the_fallback_and_flags_nothing() -> None:
    ood, is_ood = _model().flag({"latent_loglik": torch.tensor([1.0, -2.0, float("nan")])})
    torch.testing.assert_close(ood, torch.tensor([-1.0, 2.0, float("nan")]), equal_nan=True)
    assert is_ood.tolist() == [False, False, False]


def test_flag_with_a_threshold_flags_scores_below_it() -> None:
    model = _model()
    model.config.fitted.threshold = Threshold("max_logit", 0.5)
    ood, is_ood = model.flag({"max_logit": torch.tensor([1.0, 0.25, float("nan")])})
    assert is_ood.tolist() == [False, True, False] and ood[1] == -0.25


def test_names_alone_refuse_what_no_model_makes() -> None:
    assert unknown_columns(["pred", "knn", "det_anything", "pixels"]) == ["pixels"]
