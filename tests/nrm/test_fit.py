"""nrm.fit: sigma^2, the normaliser log Z(y) and the threshold, each against a computation done here."""

from __future__ import annotations

import math

import pytest
import torch
from support import tiny_config

import nrm
from nrm.fit import NORMALISERS, fit, log_partition


def _model(seed: int = 0) -> nrm.NRM:
    torch.manual_seed(seed)
    model = nrm.NRM(tiny_config(channels=1, size=8, classes=3)).eval().requires_grad_(False)
    clf = model.node_params("classifier")
    with torch.no_grad():  # spread the predictions over the classes: sharper, centred logits
        clf["weight"].mul_(20.0)
        clf["bias"].sub_(model(_data(99, 200)).mean(0))
    return model


def _data(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _manual(model: nrm.NRM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual (N, D), eta (N,), pred (N,)) from the renderer and the classifier directly."""
    r = model.render(x)
    return (x - r.h0).flatten(1).double(), r.eta_layers.sum(1).double(), model(x).argmax(1)


# --------------------------------------------------------------------------- log_partition on hand-made tensors


def test_log_partition_estimators_by_hand() -> None:
    eta = torch.tensor([1.0, 2.0, 3.0, 10.0])
    pred = torch.tensor([0, 0, 1, 1])
    none = log_partition(eta, pred, 3, "none")
    assert none.dtype == torch.float64 and none.tolist() == [0.0, 0.0, 0.0]

    mean = log_partition(eta, pred, 3, "class_mean")
    assert mean.tolist() == pytest.approx([1.5, 6.5, 4.0])  # class 2 has no sample: the overall mean

    def harmonic(v: list[float]) -> float:  # -log mean exp(-eta)
        return -math.log(sum(math.exp(-e) for e in v) / len(v))

    harm = log_partition(eta, pred, 3, "harmonic")
    assert harm.tolist() == pytest.approx([harmonic([1, 2]), harmonic([3, 10]), harmonic([1, 2, 3, 10])], abs=1e-12)
    # the harmonic mean sits below the arithmetic mean (Jensen), above the minimum
    assert all(mn <= h <= m for h, m, mn in zip(harm.tolist(), mean.tolist(), [1, 3, 1], strict=True))


def test_harmonic_is_stable_for_large_eta() -> None:
    eta = torch.tensor([-1000.0, -1001.0, 2000.0])
    harm = log_partition(eta, torch.tensor([0, 0, 1]), 2, "harmonic")
    assert torch.isfinite(harm).all()
    assert harm[0].item() == pytest.approx(-1000.0 - math.log((1 + math.e) / 2), abs=1e-9)
    assert harm[1].item() == pytest.approx(2000.0)


def test_unknown_normaliser_raises() -> None:
    with pytest.raises(ValueError, match="bogus"):
        log_partition(torch.zeros(3), torch.zeros(3, dtype=torch.long), 2, "bogus")
    model = _model()
    with pytest.raises(ValueError, match=r"unknown normaliser 'bogus'.*class_mean"):
        fit(model, [_data(0, 8)], [_data(1, 8)], normaliser="bogus")


# --------------------------------------------------------------------------- fit on a model


def test_fit_sigma2_is_mean_squared_residual_per_value() -> None:
    model = _model()
    batches = [_data(0, 20), _data(1, 13)]
    fitted = fit(model, batches, [_data(2, 10)], normaliser="none")
    residual = torch.cat([_manual(model, x)[0] for x in batches])  # (33, 64)
    expected = residual.pow(2).mean().item()
    assert fitted.sigma2 == pytest.approx(expected, rel=1e-5)
    assert fitted.log_partition == [0.0, 0.0, 0.0] and fitted.normaliser == "none"
    # installed on the model and in its config
    assert model.config.fitted is fitted
    assert torch.equal(model.log_partition, torch.zeros(3))


@pytest.mark.parametrize("normaliser", ["class_mean", "harmonic"])
def test_fit_log_partition_per_predicted_class(normaliser: str) -> None:
    model = _model()
    batches = [_data(3, 40), _data(4, 40)]
    fitted = fit(model, batches, [_data(5, 20)], normaliser=normaliser)
    parts = [_manual(model, x) for x in batches]
    eta = torch.cat([p[1] for p in parts])
    pred = torch.cat([p[2] for p in parts])
    assert len(set(pred.tolist())) >= 2, "test setup: predictions should cover several classes"
    for y in range(3):
        e = eta[pred == y] if (pred == y).any() else eta
        if normaliser == "class_mean":
            expected = e.mean().item()
        else:
            expected = -(torch.logsumexp(-e, 0) - math.log(e.numel())).item()
        assert fitted.log_partition[y] == pytest.approx(expected, rel=1e-4, abs=1e-4), y
    torch.testing.assert_close(model.log_partition, torch.tensor(fitted.log_partition, dtype=torch.float32))
    # latent_loglik now subtracts it
    x = _data(6, 9)
    out = model.score(x)
    torch.testing.assert_close(out["latent_loglik"], out["latent_prior"] - model.log_partition[out["pred"]])


@pytest.mark.parametrize(("score", "tpr"), [("latent_loglik", 0.95), ("max_softmax", 0.95), ("loglik_bound", 0.8)])
def test_threshold_keeps_tpr_of_validation(score: str, tpr: float) -> None:
    model = _model()
    val = [_data(8, 37), _data(9, 23)]
    fitted = fit(model, [_data(7, 30)], val, normaliser="class_mean", threshold_score=score, tpr=tpr)
    th = fitted.threshold
    assert th is not None and th.score == score and th.tpr == tpr
    s = torch.cat([model.score(x)[score] for x in val])
    kept = (s >= th.value).double().mean().item()
    assert kept >= tpr
    # the largest such threshold: it is one of the validation scores, and anything above keeps fewer
    assert torch.isclose(s, torch.tensor(th.value, dtype=s.dtype)).any()
    above = s[s > th.value]
    if len(above):
        assert (s >= above.min()).double().mean().item() < tpr


@pytest.mark.parametrize("score", ["energy", "recon_sq_error", "pred", "nonexistent"])
def test_threshold_score_must_be_higher_is_in(score: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match=rf"threshold score '{score}'.*latent_loglik"):
        fit(model, [_data(0, 8)], [_data(1, 8)], threshold_score=score)


def test_threshold_score_per_layer_vector_is_refused() -> None:
    with pytest.raises(ValueError):
        fit(_model(), [_data(0, 8)], [_data(1, 8)], threshold_score="latent_prior_layers")


def test_threshold_score_per_layer_vector_is_named() -> None:
    with pytest.raises(ValueError, match="latent_prior_layers"):
        fit(_model(), [_data(0, 8)], [_data(1, 8)], threshold_score="latent_prior_layers")


def test_normalisers_constant() -> None:
    assert set(NORMALISERS) == {"none", "class_mean", "harmonic"}
