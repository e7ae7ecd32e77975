"""nrm.scores: each pure function against its formula on hand-made tensors; NRM.score's columns;
NRM.preprocess and the input checks at the boundary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import tiny_config

import nrm
from nrm import scores as S
from nrm.config import Fitted
from nrm.fit import apply

EXPECTED_COLUMNS = {"pred", "max_softmax", "max_logit", "energy", "latent_prior_layers", "latent_prior",
                    "latent_loglik", "recon_sq_error", "loglik_bound"}


# --------------------------------------------------------------------------- pure functions


def test_higher_is_in_directions() -> None:
    assert S.HIGHER_IS_IN == {
        "latent_prior": True,
        "latent_prior_layers": True,
        "latent_loglik": True,
        "recon_sq_error": False,
        "loglik_bound": True,
        "max_softmax": True,
        "max_logit": True,
        "energy": False,
        "mahalanobis_feat": True,
        "knn": True,
        "vim": True,
    }
    assert set(S.COLUMNS) == EXPECTED_COLUMNS and S.COLUMNS[0] == "pred" and len(S.COLUMNS) == len(EXPECTED_COLUMNS)
    assert nrm.COLUMNS is S.COLUMNS and nrm.HIGHER_IS_IN is S.HIGHER_IS_IN


def test_latent_prior_sums_layers() -> None:
    eta = torch.tensor([[1.0, 2.0, -0.5], [3.0, -4.0, 0.0]])
    torch.testing.assert_close(S.latent_prior(eta), torch.tensor([2.5, -1.0]), atol=0, rtol=0)


def test_latent_loglik_subtracts_log_partition_of_pred() -> None:
    prior = torch.tensor([1.0, 2.0, 3.0, 4.0])
    pred = torch.tensor([2, 0, 1, 2])
    log_z = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)  # dtype follows latent_prior
    out = S.latent_loglik(prior, pred, log_z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0 - 30, 2.0 - 10, 3.0 - 20, 4.0 - 30]), atol=0, rtol=0)


def test_recon_sq_error_sums_every_value() -> None:
    x = torch.arange(2 * 2 * 2 * 3, dtype=torch.float64).view(2, 2, 2, 3)
    h0 = torch.ones_like(x)
    expected = torch.tensor([sum((v - 1.0) ** 2 for v in range(12)), sum((v - 1.0) ** 2 for v in range(12, 24))],
                            dtype=torch.float64)
    torch.testing.assert_close(S.recon_sq_error(x, h0), expected, atol=0, rtol=0)


@pytest.mark.parametrize("sigma2", [1.0, 0.5, 2.5])
def test_loglik_bound_formula(sigma2: float) -> None:
    recon = torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64)
    loglik = torch.tensor([1.0, -1.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([-2.0 / (2 * sigma2) + 1.0, -4.0 / (2 * sigma2) - 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(S.loglik_bound(recon, loglik, sigma2), expected, atol=1e-15, rtol=0)


def test_classifier_scores_formulas() -> None:
    rows = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-5.0, 10.0, 2.0]]
    logits = torch.tensor(rows, dtype=torch.float64)
    out = S.classifier_scores(logits)
    assert set(out) == {"pred", "max_softmax", "max_logit", "energy"}
    assert out["pred"].tolist() == [2, 0, 1]  # ties: the first maximum
    for i, r in enumerate(rows):
        lse = math.log(sum(math.exp(v) for v in r))
        assert out["max_logit"][i].item() == max(r)
        assert out["max_softmax"][i].item() == pytest.approx(math.exp(max(r) - lse), abs=1e-15)
        assert out["energy"][i].item() == pytest.approx(-lse, abs=1e-14)
    torch.testing.assert_close(S.max_softmax(logits), out["max_softmax"])
    torch.testing.assert_close(S.max_logit(logits), out["max_logit"])
    torch.testing.assert_close(S.energy(logits), out["energy"])


def test_energy_is_stable_for_large_logits() -> None:
    logits = torch.tensor([[1000.0, 1000.0]])
    assert S.energy(logits).item() == pytest.approx(-(1000.0 + math.log(2.0)))
    assert S.max_softmax(logits).item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- NRM.score


@pytest.fixture
def model() -> nrm.NRM:
    torch.manual_seed(0)
    return nrm.NRM(tiny_config(channels=1, size=8, classes=3)).eval().requires_grad_(False)


def test_score_columns_shapes_dtypes(model: nrm.NRM) -> None:
    x = torch.randn(5, 1, 8, 8)
    out = model.score(x)
    assert set(out) >= EXPECTED_COLUMNS  # the public columns; score() may add more after them
    assert all(v.shape[0] == 5 for v in out.values())
    assert out["pred"].dtype == torch.int64 and out["pred"].shape == (5,)
    assert out["latent_prior_layers"].shape == (5, len(model.bias_nodes)) == (5, 2)
    for col in EXPECTED_COLUMNS - {"pred", "latent_prior_layers"}:
        assert out[col].shape == (5,), col
        assert out[col].dtype == torch.float32, col
        assert torch.isfinite(out[col]).all(), col
    assert out["latent_prior_layers"].dtype == torch.float32
    assert not any(v.requires_grad for v in out.values())
    assert set(model.extra_columns) <= set(out)


def test_score_matches_independent_computation(model: nrm.NRM) -> None:
    x = torch.randn(6, 1, 8, 8)
    out = model.score(x)
    logits = model(x)
    r = model.render(x)
    torch.testing.assert_close(out["pred"], logits.argmax(1))
    torch.testing.assert_close(out["max_softmax"], logits.softmax(1).max(1).values)
    torch.testing.assert_close(out["max_logit"], logits.max(1).values)
    torch.testing.assert_close(out["energy"], -torch.logsumexp(logits, 1))
    torch.testing.assert_close(out["latent_prior_layers"], r.eta_layers)
    torch.testing.assert_close(out["latent_prior"], r.eta_layers.sum(1))
    torch.testing.assert_close(out["recon_sq_error"], (x - r.h0).pow(2).sum((1, 2, 3)))
    # unfitted: log Z = 0, sigma2 = 1
    torch.testing.assert_close(out["latent_loglik"], out["latent_prior"])
    torch.testing.assert_close(out["loglik_bound"], -out["recon_sq_error"] / 2 + out["latent_prior"])


def test_score_uses_log_partition_of_pred_and_sigma2(model: nrm.NRM) -> None:
    log_z = [0.5, -7.0, 3.25]
    sigma2 = 0.37
    apply(model, Fitted(sigma2=sigma2, log_partition=log_z, normaliser="class_mean"))
    x = torch.randn(30, 1, 8, 8)
    out = model.score(x)
    expected_ll = out["latent_prior"] - torch.tensor(log_z)[out["pred"]]
    torch.testing.assert_close(out["latent_loglik"], expected_ll)
    torch.testing.assert_close(out["loglik_bound"], -out["recon_sq_error"] / (2 * sigma2) + expected_ll)


def test_score_latent_loglik_per_class_with_forced_predictions(model: nrm.NRM) -> None:
    """Force each class to be predicted (via the classifier bias) and check log Z[pred] is used."""
    log_z = torch.tensor([100.0, 200.0, 300.0])
    apply(model, Fitted(log_partition=log_z.tolist()))
    x = torch.randn(4, 1, 8, 8)
    bias = model.node_params("classifier")["bias"]
    for k in range(3):
        with torch.no_grad():
            bias.zero_()
            bias[k] = 1e4
        out = model.score(x)
        assert out["pred"].tolist() == [k] * 4
        torch.testing.assert_close(out["latent_loglik"], out["latent_prior"] - log_z[k])


def test_score_output_order_is_columns(model: nrm.NRM) -> None:
    assert [c for c in model.score(torch.randn(2, 1, 8, 8)) if c in S.COLUMNS] == S.COLUMNS


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 1, 8, 9), (2, 3, 8, 8), (2, 1, 1, 8, 8), (1, 64)])
def test_score_rejects_wrong_input_shape(model: nrm.NRM, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(" + ", ".join(map(str, shape)) + r"\)"):
        model.score(torch.randn(*shape))


# --------------------------------------------------------------------------- preprocess


def rgb_model() -> nrm.NRM:
    cfg = tiny_config(channels=3, size=6, classes=2)
    cfg.input = nrm.InputSpec(3, 6, 6, (0.1, 0.5, 0.9), (0.2, 0.25, 0.5))
    return nrm.NRM(cfg).eval()


def test_preprocess_rgb_nhwc() -> None:
    m = rgb_model()
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8))
    x = m.preprocess(img)
    assert x.shape == (4, 3, 6, 6) and x.dtype == torch.float32
    mean = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    expected = (img.permute(0, 3, 1, 2).double() / 255.0 - mean.double()) / std.double()
    torch.testing.assert_close(x.double(), expected, atol=1e-6, rtol=0)
    assert x[1, 2, 3, 4].item() == pytest.approx((img[1, 3, 4, 2].item() / 255 - 0.9) / 0.5, abs=1e-6)


@pytest.mark.parametrize("layout", ["nhw", "nhwc"])
def test_preprocess_grayscale(layout: str) -> None:
    m = nrm.NRM(tiny_config(channels=1, size=8)).eval()  # mean 0.5, std 0.25
    img = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8))
    x = m.preprocess(img if layout == "nhw" else img[..., None])
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0].double(), (img.double() / 255 - 0.5) / 0.25, atol=1e-6, rtol=0)
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6


@pytest.mark.parametrize(("channels", "shape"), [
    (3, (2, 6, 6)),  # NHW only for grayscale
    (3, (2, 3, 6, 6)),  # channels-first
    (3, (2, 6, 6, 1)),
    (3, (2, 7, 6, 3)),
    (1, (2, 8, 8, 3)),
    (1, (8, 8)),
    (1, (2, 1, 8, 8, 1)),
])
def test_preprocess_rejects_wrong_shape(channels: int, shape: tuple[int, ...]) -> None:
    m = rgb_model() if channels == 3 else nrm.NRM(tiny_config(channels=1, size=8)).eval()
    with pytest.raises(ValueError, match=r"shape \(" + ", ".join(map(str, shape)) + r",?\)"):
        m.preprocess(torch.zeros(shape, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.int8, torch.bool])
def test_preprocess_rejects_non_uint8(dtype: torch.dtype) -> None:
    m = nrm.NRM(tiny_config(channels=1, size=8)).eval()
    with pytest.raises(ValueError, match="uint8") as e:
        m.preprocess(torch.zeros((2, 8, 8), dtype=dtype))
    assert str(dtype) in str(e.value)
