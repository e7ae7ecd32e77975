"""nrm.detectors: each score against its formula, the fits against known data, the checkpoint round
trip, and the det_ columns of NRM.score."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support import assert_same_config, tiny_config

import nrm
from nrm import detectors as D
from nrm.fit import fit, refit


def _model(seed: int = 0) -> nrm.NRM:
    torch.manual_seed(seed)
    return nrm.NRM(tiny_config(channels=1, size=8, classes=3)).eval().requires_grad_(False)


def _data(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- formulas on known tensors
def test_typicality_formula() -> None:
    f = torch.tensor([[1.0, 2.0], [5.0, -1.0]], dtype=torch.float64)
    pred = torch.tensor([0, 1])
    median = torch.tensor([[0.0, 0.0], [4.0, 1.0]], dtype=torch.float64)
    mad = torch.tensor([[1.0, 2.0], [0.5, 4.0]], dtype=torch.float64)
    s = D.typicality(f, pred, median, mad)
    torch.testing.assert_close(s, torch.tensor([-(1 / 1 + 2 / 2), -(1 / 0.5 + 2 / 4)], dtype=torch.float64))
    # two-sided: equally far below and above the median score the same
    lo, hi = torch.tensor([[-3.0, 0.0]], dtype=torch.float64), torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([0])
    assert D.typicality(lo, z, median, mad) == D.typicality(hi, z, median, mad)


def test_mahalanobis_formula() -> None:
    f = torch.tensor([[1.0, 1.0], [3.0, 0.0]], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    precision = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    s = D.mahalanobis(f, torch.tensor([0, 1]), means, precision)
    # d0 = (1, 1): 2 + 2*0.5 + 1 = 4;  d1 = (2, 0): 2 * 4 = 8
    torch.testing.assert_close(s, torch.tensor([-4.0, -8.0], dtype=torch.float64))


def test_gmm_loglik_formula() -> None:
    f = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    one = D.gmm_loglik(f, torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64), eye[None])
    torch.testing.assert_close(one, -0.5 * f.pow(2).sum(1) - math.log(2 * math.pi))
    # two components: log(w1 N(f; m1, S1) + w2 N(f; m2, S2)), S2 = 4 I
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    m = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    covs = torch.stack([eye, 4 * eye])
    s = D.gmm_loglik(f, w, m, covs)
    n1 = torch.exp(-0.5 * f.pow(2).sum(1)) / (2 * math.pi)
    n2 = torch.exp(-0.5 * (f - m[1]).pow(2).sum(1) / 4) / (2 * math.pi * 4)
    torch.testing.assert_close(s, torch.log(0.25 * n1 + 0.75 * n2))


# --------------------------------------------------------------------------- fits on known data
def test_fit_typicality_median_and_mad_per_class() -> None:
    f = torch.tensor([[1.0], [2.0], [4.0], [10.0], [20.0], [30.0]], dtype=torch.float64)
    pred = torch.tensor([0, 0, 0, 1, 1, 1])
    p = D.fit_typicality(f, pred, 3)
    assert p["median"].dtype == p["mad"].dtype == torch.float64
    # an empty class (2) gets the pooled median (torch's lower middle value, 4) and its MAD
    assert p["median"].tolist() == [[2.0], [20.0], [4.0]]
    assert p["mad"][:2].tolist() == [[1.0], [10.0]]


def test_fit_mahalanobis_recovers_means_and_precision() -> None:
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    centres = torch.tensor([[0.0, 0.0], [10.0, -5.0]], dtype=torch.float64)
    pred = torch.arange(20000) % 2
    f = centres[pred] + torch.randn(20000, 2, generator=g, dtype=torch.float64) @ chol.T
    p = D.fit_mahalanobis(f, pred, 2)
    assert p["means"].dtype == p["precision"].dtype == torch.float64
    torch.testing.assert_close(p["means"], centres, atol=0.06, rtol=0)
    torch.testing.assert_close(p["precision"], torch.linalg.inv(cov), atol=0.05, rtol=0)


def test_fit_gmm_finds_two_clusters() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(600, 2, generator=g, dtype=torch.float64)
    b = torch.randn(200, 2, generator=g, dtype=torch.float64) * 0.5 + torch.tensor([8.0, 8.0], dtype=torch.float64)
    p = D.fit_gmm(torch.cat([a, b]), components=2)
    w, m = p["weights"], p["means"]
    order = m[:, 0].argsort()
    torch.testing.assert_close(w[order], torch.tensor([0.75, 0.25], dtype=w.dtype), atol=0.01, rtol=0)
    torch.testing.assert_close(m[order], torch.tensor([[0.0, 0.0], [8.0, 8.0]], dtype=m.dtype), atol=0.15, rtol=0)


def test_features() -> None:
    cols = {"latent_prior": torch.tensor([1.0, 2.0]), "latent_prior_layers": torch.tensor([[0.5, 0.5], [1.0, 1.0]]),
            "latent_prior_channels": torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 1.0]]),
            "recon_sq_error": torch.tensor([1.0, math.e])}
    assert D.features(cols, "eta").tolist() == [[1.0], [2.0]]
    torch.testing.assert_close(D.features(cols, "layers_recon"),
                               torch.tensor([[0.5, 0.5, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
    assert D.features(cols, "channels").shape == (2, 3)
    torch.testing.assert_close(D.features(cols, "channels_recon")[:, -1], torch.tensor([0.0, 1.0], dtype=torch.float64))


# --------------------------------------------------------------------------- the model's columns
def test_eta_channels_sum_to_eta_layers_and_renderers_agree() -> None:
    model = _model().double()
    x = _data(0, 5).double()
    fast, slow = model.render(x), model.render_explicit(model.encode(x))
    assert fast.eta_channels is not None and fast.eta_channels.shape == (5, 4 + 6)
    torch.testing.assert_close(fast.eta_channels, slow.eta_channels)
    torch.testing.assert_close(torch.stack([fast.eta_channels[:, :4].sum(1), fast.eta_channels[:, 4:].sum(1)], 1),
                               fast.eta_layers)


@pytest.mark.parametrize("name", D.DETECTORS)
@pytest.mark.parametrize("features", ["channels_recon", "gates_acts"])
def test_columns_present_and_oriented(name: str, features: str) -> None:
    model = _model()
    assert model.extra_columns == []
    plain = model.score(_data(0, 4))
    assert not any(k.startswith("det_") for k in plain)
    assert "latent_gates" not in plain  # computed only when a detector reads them
    refit(model, [_data(1, 200), _data(2, 200)], name=name, feature_set=features)
    assert ("latent_gates" in model.score(_data(0, 4))) == (features == "gates_acts")
    assert model.extra_columns == [f"det_{name}"]
    th = model.config.fitted.threshold
    assert th is not None and th.score == f"det_{name}" and th.tpr == 0.95
    inside, outside = model.score(_data(3, 100)), model.score(_data(4, 100) * 30 + 5)
    assert inside[f"det_{name}"].shape == (100,) and inside[f"det_{name}"].dtype == torch.float32
    # higher = more in-distribution: fresh in-distribution samples beat far-off inputs almost always
    assert (inside[f"det_{name}"].median() > outside[f"det_{name}"].quantile(0.9)).item()
    kept = (inside[f"det_{name}"] >= th.value).double().mean().item()
    assert 0.8 < kept <= 1.0


@pytest.mark.parametrize("name", D.DETECTORS)
def test_round_trip_through_checkpoint(name: str, tmp_path: Path) -> None:
    model = _model()
    fitted = fit(model, [_data(0, 64)], [_data(1, 120)], detector=name, threshold_score=f"det_{name}")
    assert fitted.detector is not None
    assert fitted.detector.main.name == name and fitted.detector.main.features == D.DEFAULT_FEATURES
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in fitted.detector.main.tensors().values())
    json.dumps(model.config.to_json()[0])  # the arrays are references into weights.safetensors
    nrm.save(model, tmp_path / "c")
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["detectors"]["fitted"][0]["name"] == name and saved["threshold"]["score"] == f"det_{name}"
    loaded = nrm.load(tmp_path / "c")
    assert loaded.extra_columns == [f"det_{name}"]
    assert_same_config(loaded.config, model.config)
    x = _data(2, 9)
    a, b = model.score(x), loaded.score(x)
    assert a.keys() == b.keys() and f"det_{name}" in a
    torch.testing.assert_close(a[f"det_{name}"], b[f"det_{name}"], atol=0, rtol=0)


def test_fit_without_detector_is_unchanged() -> None:
    model = _model()
    fitted = fit(model, [_data(0, 32)], [_data(1, 32)])
    assert fitted.detector is None and model.extra_columns == []
    assert fitted.threshold is not None and fitted.threshold.score == "latent_loglik"


# --------------------------------------------------------------------------- refusals
def test_unknown_detector_name_is_refused() -> None:
    cols = _model().score(_data(0, 8))
    with pytest.raises(D.DetectorError, match=r"unknown detector 'knn'; expected one of \['typicality', 'mahalanobis', 'gmm', 'mahalanobis_energy', 'mahalanobis_energy_robust'\]"):
        D.lookup("knn", D.StatisticsDetector)
    with pytest.raises(ValueError, match=r"unknown detector 'knn'"):
        fit(_model(), [_data(0, 8)], [_data(1, 8)], detector="knn")
    with pytest.raises(ValueError, match=r"unknown detector 'knn'"):
        refit(_model(), [_data(0, 8)], name="knn")
    with pytest.raises(ValueError, match=r"unknown detector feature set 'pixels'.*channels_recon"):
        D.Mahalanobis("pixels")
    with pytest.raises(ValueError, match=r"unknown detector feature set 'pixels'.*channels_recon"):
        D.features(cols, "pixels")


def test_checkpoint_with_unknown_detector_is_refused(tmp_path: Path) -> None:
    model = _model()
    refit(model, [_data(0, 40)])
    nrm.save(model, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["detectors"]["fitted"][0]["name"] = "pixels"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown detector 'pixels'; expected one of \['typicality', 'mahalanobis', 'gmm', "
                                         r"'mahalanobis_energy', 'mahalanobis_energy_robust', 'mahalanobis_feat', 'knn', 'vim'\]"):
        nrm.load(tmp_path / "c")


def test_threshold_on_det_column_needs_that_detector() -> None:
    with pytest.raises(ValueError, match=r"threshold score 'det_gmm'"):
        fit(_model(), [_data(0, 8)], [_data(1, 8)], threshold_score="det_gmm")
    with pytest.raises(ValueError, match=r"threshold score 'det_gmm'.*det_mahalanobis"):
        fit(_model(), [_data(0, 8)], [_data(1, 8)], detector="mahalanobis", threshold_score="det_gmm")


def test_refit_keeps_every_candidate_as_a_named_score(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nrm.NRM(tiny_config()).eval().requires_grad_(False)
    x = torch.randn(80, *model.input_shape)
    refit(model, [x[:40], x[40:]], candidates=True)
    names = [D.PREFIX + "mahalanobis"] + [f"{D.PREFIX}{n}_{f}" for n, f in D.CANDIDATES if (n, f) != ("mahalanobis", D.DEFAULT_FEATURES)]
    assert model.extra_columns == names
    assert model.config.fitted.threshold is not None and model.config.fitted.threshold.score == "det_mahalanobis"
    cols = model.score(x[:7])
    assert all(cols[c].shape == (7,) and torch.isfinite(cols[c]).all() for c in names)
    nrm.save(model, tmp_path / "ck")
    again = nrm.load(tmp_path / "ck").score(x[:7])
    for c in names:
        torch.testing.assert_close(again[c], cols[c], rtol=1e-4, atol=1e-4)
    # each candidate column is that detector's own score, not the primary's
    assert not torch.equal(cols["det_typicality_eta"], cols["det_mahalanobis"])


# --------------------------------------------------------------------------- latent gate statistics and the choice
def test_unit_stats_are_the_gates_of_the_bottom_up_pass() -> None:
    model = _model().double()
    x = _data(5, 6).double()
    cols, lat = model.score(x, unit_stats=True), model.encode(x)
    pre = [lat.values[k] for k in model.bias_nodes]  # (N, C, H, W) each
    rates = torch.cat([(z > 0).double().mean(dim=(2, 3)) for z in pre], 1)
    acts = torch.cat([z.clamp_min(0).mean(dim=(2, 3)) for z in pre], 1)
    # score's columns are float32 whatever the model's dtype
    torch.testing.assert_close(cols["latent_gates"], rates.float(), atol=0, rtol=0)
    torch.testing.assert_close(cols["unit_acts"], acts.float())
    # the same gates the explicit renderer multiplies by: s*(l) of the ReLU after each bias layer
    relu = [n.name for n in model.config.nodes if n.inputs[0] in model.bias_nodes]
    assert relu == ["relu1", "relu2"]
    torch.testing.assert_close(rates, torch.cat([lat.latents[k].mean(dim=(2, 3)) for k in relu], 1), atol=0, rtol=0)
    assert ((rates >= 0) & (rates <= 1)).all() and rates.shape == (6, 4 + 6)


def test_unit_stats_of_a_linear_layer_are_its_gates_and_positive_part() -> None:
    z = torch.tensor([[-1.5, 0.0, 2.0], [3.0, -0.5, 0.25]])  # (N, F): a hidden linear layer, one position
    rates, acts = _model().unit_stats([z])
    torch.testing.assert_close(rates, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]), atol=0, rtol=0)
    torch.testing.assert_close(acts, torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.25]]), atol=0, rtol=0)


def test_unit_stats_of_a_bf16_map_are_float32_within_one_bf16_rounding() -> None:
    # a bf16 map is summed in bf16 (torch accumulates in float32, then rounds once) and widened
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 8, 32, 32, generator=g).to(torch.bfloat16)  # 1,024 positions per channel
    rates, acts = _model().unit_stats([z])
    zd = z.double()
    assert rates.dtype == acts.dtype == torch.float32
    torch.testing.assert_close(rates.double(), (zd > 0).double().mean(dim=(2, 3)), rtol=2**-8, atol=0)
    torch.testing.assert_close(acts.double(), zd.clamp_min(0).mean(dim=(2, 3)), rtol=2**-8, atol=0)


def test_gate_feature_sets_concatenate_their_parts() -> None:
    cols = _model().score(_data(0, 5), unit_stats=True)
    g, a = cols["latent_gates"].double(), cols["unit_acts"].double()
    torch.testing.assert_close(D.features(cols, "gates"), g)
    torch.testing.assert_close(D.features(cols, "gates_acts"), torch.cat([g, a], 1))
    f = D.features(cols, "gates_channels_recon")
    assert f.shape == (5, 10 + 10 + 1)
    torch.testing.assert_close(f[:, -1], cols["recon_sq_error"].double().log())


def _synthetic(seed: int, n: int, shift_gates: float, shift_channels: float, shift_energy: float = 0.0,
               ) -> dict[str, torch.Tensor]:
    """Score columns where the gate rates, the per-channel terms and the energy can be moved apart independently."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    channels = r(n, 4) + shift_channels
    return {"pred": torch.zeros(n, dtype=torch.long), "latent_prior": channels.sum(1),
            "latent_prior_layers": torch.stack([channels[:, :2].sum(1), channels[:, 2:].sum(1)], 1),
            "latent_prior_channels": channels, "latent_gates": r(n, 3) + shift_gates,
            "unit_acts": r(n, 3), "recon_sq_error": r(n).exp(), "energy": r(n) + shift_energy}


def test_choose_picks_the_features_that_separate_every_validation_set() -> None:
    fit_cols, in_cols = _synthetic(0, 400, 0, 0), _synthetic(1, 400, 0, 0)
    # set A moves only the per-channel terms, set B only the gate rates: only features with gates
    # AND channels catch both, so gates_channels_recon has the best worst case
    ood = {"a": _synthetic(2, 300, 0, 3.0), "b": _synthetic(3, 300, 3.0, 0)}
    det = D.choose(fit_cols, in_cols, ood, n_classes=1)
    assert (det.main.name, det.main.features) == ("mahalanobis", "gates_channels_recon")
    assert det.main.column == "det_mahalanobis" and det.candidates == []
    table = det.selection
    assert set(table) == {f"det_{n}_{f}" for n, f in D.SEARCH}
    assert table["det_mahalanobis_gates_channels_recon"]["a"] > 0.95
    assert table["det_mahalanobis_gates_channels_recon"]["b"] > 0.95
    assert table["det_mahalanobis_gates"]["a"] < 0.6 and table["det_mahalanobis_channels_recon"]["b"] < 0.6
    # the winner's worst case is the best worst case of the table
    assert min(table["det_mahalanobis_gates_channels_recon"].values()) == max(min(r.values()) for r in table.values())
    # only set B: the gates alone are enough and tie on the worst case; the higher mean breaks it
    only_b = D.choose(fit_cols, in_cols, {"b": ood["b"]}, n_classes=1)
    assert "gates" in only_b.main.features
    with pytest.raises(ValueError, match="no validation OOD sets"):
        D.choose(fit_cols, in_cols, {}, n_classes=1)


def test_refit_chooses_on_validation_ood_and_saves_the_table(tmp_path: Path) -> None:
    model = _model()
    ood = {"far": [_data(9, 150) * 30 + 5]}
    det = refit(model, [_data(1, 200), _data(2, 200)], val_ood=ood)
    assert det.selection.keys() == {f"det_{n}_{f}" for n, f in D.SEARCH}
    th = model.config.fitted.threshold
    assert th is not None and th.score == f"det_{det.main.name}" and model.extra_columns == [f"det_{det.main.name}"]
    assert min(det.selection[f"det_{det.main.name}_{det.main.features}"].values()) > 0.9
    nrm.save(model, tmp_path / "c")
    loaded = nrm.load(tmp_path / "c").config.fitted.detector
    assert loaded is not None and loaded.selection == det.selection


# --------------------------------------------------------------------------- the detector objects
def _gate_cols(seed: int, n: int, width: int = 3) -> dict[str, torch.Tensor]:
    """Score columns for the gates_acts feature set (2 * width values), predictions over 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return {"pred": torch.randint(3, (n,), generator=g), "latent_gates": torch.rand(n, width, generator=g),
            "unit_acts": torch.randn(n, width, generator=g).abs(), "energy": torch.randn(n, generator=g)}


# name -> (the pure fit, the pure score on its fitted tensors)
PURE = {
    "typicality": (D.fit_typicality, lambda f, p, t: D.typicality(f, p, t["median"], t["mad"])),
    "mahalanobis": (D.fit_mahalanobis, lambda f, p, t: D.mahalanobis(f, p, t["means"], t["precision"])),
    "gmm": (lambda f, p, k: D.fit_gmm(f), lambda f, p, t: D.gmm_loglik(f, t["weights"], t["means"], t["covs"])),
}


@pytest.mark.parametrize("name", PURE)
def test_each_detector_fits_and_scores_as_its_pure_functions(name: str) -> None:
    fit_cols, cols = _gate_cols(0, 300), _gate_cols(1, 40)
    det = D.lookup(name)("gates_acts").fit(fit_cols, 3)
    fit_fn, score_fn = PURE[name]
    expected = fit_fn(D.features(fit_cols, "gates_acts"), fit_cols["pred"], 3)
    assert det.tensors().keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(det.tensors()[k], v), k
    s = det.score(cols)
    assert s.dtype == torch.float32 and s.shape == (40,)
    torch.testing.assert_close(s, score_fn(D.features(cols, "gates_acts"), cols["pred"], expected).float(),
                               atol=0, rtol=0)


def test_mahalanobis_on_many_features_stays_close_to_the_float64_formula() -> None:
    fit_cols, cols = _gate_cols(0, 1500, D.FAST_DIMS // 2), _gate_cols(1, 30, D.FAST_DIMS // 2)
    det = D.Mahalanobis("gates_acts").fit(fit_cols, 3)  # D = FAST_DIMS: the float32 product
    t = det.tensors()
    exact = D.mahalanobis(D.features(cols, "gates_acts"), cols["pred"], t["means"], t["precision"])
    torch.testing.assert_close(det.score(cols).double(), exact, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("block", [1, 4, 7, 11])
def test_the_blocked_quadratic_form_is_d_p_d(block: int) -> None:
    # 11 features in blocks of 1, 4 (a short last block), 7 and 11 (one block: the whole product)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(11, 11, generator=g, dtype=torch.float64)
    p, d = a @ a.T, torch.randn(5, 11, generator=g, dtype=torch.float64)
    exact = ((d @ p) * d).sum(dim=1)
    got = D.quadratic_form(d.float(), D.symmetric_slabs(p, block))
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_a_refit_detector_scores_with_its_new_state_not_a_stale_copy() -> None:
    # the fitted tensors are copied to the scoring device (and to float32) once per fit: a refit
    # must replace those copies
    small = _gate_cols(0, 1500, D.FAST_DIMS // 2)
    other = {k: v.flip(0) * (1.5 if v.is_floating_point() else 1) for k, v in _gate_cols(2, 1500, D.FAST_DIMS // 2).items()}
    cols = _gate_cols(1, 30, D.FAST_DIMS // 2)
    det = D.Mahalanobis("gates_acts").fit(small, 3)
    first = det.score(cols)
    det.fit(other, 3)
    fresh = D.Mahalanobis("gates_acts").fit(other, 3)
    torch.testing.assert_close(det.score(cols), fresh.score(cols), atol=0, rtol=0)
    assert not torch.equal(det.score(cols), first)


@pytest.mark.parametrize("name", D.DETECTORS)
def test_a_detector_used_unfitted_says_so_and_names_itself(name: str) -> None:
    with pytest.raises(D.DetectorError, match=rf"detector '{name}' is not fitted; call \w+\.fit"):
        D.lookup(name)().score(_gate_cols(0, 5))


@pytest.mark.parametrize("name", D.DETECTORS)
def test_a_state_that_does_not_match_the_columns_is_refused(name: str) -> None:
    det = D.lookup(name)("gates_acts").fit(_gate_cols(0, 300), 3)
    with pytest.raises(D.DetectorError, match=rf"detector '{name}': fitted state does not match the score columns"):
        det.score(_gate_cols(1, 5, width=2))


@pytest.mark.parametrize("name", D.DETECTORS)
def test_a_fitted_detector_round_trips_through_safetensors(name: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    det = D.lookup(name)("gates_acts", candidate=True).fit(_gate_cols(0, 300), 3)
    save_file(det.tensors(), str(tmp_path / "d.safetensors"))
    options = json.loads(json.dumps(det.options()))
    again = D.lookup(name).from_tensors(load_file(str(tmp_path / "d.safetensors")), candidate=True, **options)
    assert again.column == det.column == f"det_{name}_gates_acts"
    cols = _gate_cols(1, 20)
    assert torch.equal(again.score(cols), det.score(cols))


def test_fit_options_go_to_the_gmm_and_are_refused_elsewhere() -> None:
    cols = _gate_cols(0, 300)
    assert D.GMM("gates_acts").fit(cols, 3, components=2).tensors()["weights"].shape == (2,)
    with pytest.raises(D.DetectorError, match=r"detector 'mahalanobis': unknown fit options \['components'\]"):
        D.Mahalanobis("gates_acts").fit(cols, 3, components=2)


# --------------------------------------------------------------------------- Mahalanobis fused with energy
def test_mahalanobis_energy_is_the_standardised_sum_of_its_two_parts() -> None:
    fit_cols, cols = _gate_cols(0, 300), _gate_cols(1, 40)
    det = D.MahalanobisEnergy("gates_acts").fit(fit_cols, 3)
    t = det.tensors()
    expected_gauss = D.fit_mahalanobis(D.features(fit_cols, "gates_acts"), fit_cols["pred"], 3)  # refitted on all rows
    assert torch.equal(t["means"], expected_gauss["means"]) and torch.equal(t["precision"], expected_gauss["precision"])
    maha = D.mahalanobis(D.features(cols, "gates_acts"), cols["pred"], t["means"], t["precision"])
    # energy is higher = OOD, so its negation (log sum exp of the logits) enters
    expected = (maha - t["centre"][0]) / t["scale"][0] + (-cols["energy"].double() - t["centre"][1]) / t["scale"][1]
    torch.testing.assert_close(det.score(cols).double(), expected, rtol=1e-5, atol=1e-5)


def test_mahalanobis_energy_standardises_on_rows_its_gaussian_did_not_see() -> None:
    cols = _gate_cols(0, 500)
    det = D.MahalanobisEnergy("gates_acts").fit(cols, 3)
    # the held fifth's energy has the fitted centre and scale (energy does not depend on the Gaussian)
    held = torch.randperm(500, generator=torch.Generator().manual_seed(0))[400:]
    e = -cols["energy"].double()[held]
    torch.testing.assert_close(det.tensors()["centre"][1], e.mean())
    torch.testing.assert_close(det.tensors()["scale"][1], e.std())


def test_mahalanobis_energy_needs_the_energy_column() -> None:
    det = D.MahalanobisEnergy("gates_acts").fit(_gate_cols(0, 300), 3)
    cols = _gate_cols(1, 5)
    del cols["energy"]
    with pytest.raises(D.DetectorError, match=r"detector 'mahalanobis_energy': needs the 'energy' column"):
        det.score(cols)


def test_choose_keeps_the_pure_nrm_detector_beside_a_fused_winner() -> None:
    fit_cols, in_cols = _synthetic(0, 400, 0, 0), _synthetic(1, 400, 0, 0)
    # set A moves the gates a little and the energy (higher = OOD) a lot: only the fusion separates it well
    ood = {"a": _synthetic(2, 300, 0.8, 0, shift_energy=3.0)}
    det = D.choose(fit_cols, in_cols, ood, n_classes=1)
    assert det.main.name == "mahalanobis_energy" and det.main.column == "det_mahalanobis_energy"
    assert [(c.name, c.features, c.column) for c in det.candidates] == [
        ("mahalanobis", det.main.features, f"det_mahalanobis_{det.main.features}")]
    assert det.columns == ["det_mahalanobis_energy", f"det_mahalanobis_{det.main.features}"]


def test_refit_on_training_batches_fits_there_and_thresholds_on_every_held_out_row() -> None:
    from nrm.fit import collect

    model, train, held = _model(), [_data(1, 200)], [_data(2, 120)]
    det = refit(model, held, fit_batches=train)
    expected = D.Mahalanobis(D.DEFAULT_FEATURES).fit(collect(model, train), 3)
    assert torch.equal(det.main.tensors()["precision"], expected.tensors()["precision"])
    th = model.config.fitted.threshold
    assert th is not None
    kept = (model.score(held[0])["det_mahalanobis"] >= th.value).double().mean().item()  # 95% of all 120
    assert kept == pytest.approx(0.95, abs=1 / 120)


def test_gmm_runs_em_on_at_most_max_rows() -> None:
    f = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    capped = D.fit_gmm(f, components=1, max_rows=100)
    sample = f[torch.randperm(400, generator=torch.Generator().manual_seed(0))[:100]]
    torch.testing.assert_close(capped["means"][0], sample.mean(0))


def test_a_covariance_detector_refuses_more_features_than_its_limit() -> None:
    """A ResNet-50's gate rates (~45,000) would make a 16 GB covariance: refused by name before fitting."""
    from nrm.detectors import DetectorError, Head, lookup
    from nrm.detectors.statistics import MAX_DENSE_FEATURES

    d = MAX_DENSE_FEATURES + 1
    rows = {"pred": torch.tensor([0, 1, 0, 1]), "latent_gates": torch.rand(4, d)}
    with pytest.raises(DetectorError, match=f"gives {d:,} features, whose covariance would take 2.0 GiB"):
        lookup("mahalanobis")("gates").fit(rows, Head(2))
