"""The field's post-hoc baselines of nrm.detectors (mahalanobis_feat, knn, vim) against direct
NumPy/SciPy computations, on tiny random "classifiers" (3 classes, 8 features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from scipy.spatial.distance import cdist, mahalanobis
from scipy.special import logsumexp

from nrm.detectors import (
    KNN,
    DetectorError,
    Head,
    MahalanobisFeat,
    ViM,
    knn_distance,
    lookup,
    vim_default_dim,
    vim_residual,
)
from nrm.fit import fit_baselines
from nrm.names import POSTHOC

K, F = 3, 8
REGISTRY = {name: lookup(name) for name in POSTHOC}


def toy(n: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three Gaussian classes around 4 e_0, 4 e_1, 4 e_2, and a linear head that points at them."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.eye(K, F, dtype=torch.float64)
    labels = torch.arange(n) % K
    f = centres[labels] + torch.randn(n, F, generator=g, dtype=torch.float64)
    weight = centres / 4.0 + 0.1 * torch.randn(K, F, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(K, generator=g, dtype=torch.float64)
    return {"features": f, "logits": f @ weight.T + bias, "labels": labels, "weight": weight, "bias": bias}


def far(n: int = 40, seed: int = 1) -> torch.Tensor:
    """A cluster far from every class, in directions the classes and the head do not use."""
    g = torch.Generator().manual_seed(seed)
    return 6.0 * (torch.eye(F, dtype=torch.float64)[5] - torch.eye(F, dtype=torch.float64)[6]) \
        + 0.5 * torch.randn(n, F, generator=g, dtype=torch.float64)


def rows(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The training rows as score dicts hold them."""
    return {"penultimate": d["features"], "logits": d["logits"], "label": d["labels"]}


def head(d: dict[str, torch.Tensor]) -> Head:
    return Head(K, d["weight"], d["bias"])


def fitted(d: dict[str, torch.Tensor]) -> dict[str, MahalanobisFeat | KNN | ViM]:
    return {det.name: det for det in fit_baselines(rows(d), head(d), knn_k=5)}  # type: ignore[misc]


def scores(det: MahalanobisFeat | KNN | ViM, f: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
    return det.score({"penultimate": f, "logits": f @ d["weight"].T + d["bias"]})


# ---------------------------------------------------------------------------- each method, by its definition
def test_mahalanobis_is_minus_the_smallest_class_distance_with_the_tied_covariance() -> None:
    d = toy()
    det = MahalanobisFeat().fit(rows(d), K)
    x, y = d["features"].numpy(), d["labels"].numpy()
    mus = np.stack([x[y == k].mean(axis=0) for k in range(K)])
    vi = np.linalg.inv(np.cov((x - mus[y]).T, bias=True))
    q = toy(20, seed=5)["features"].numpy()
    want = [-min(mahalanobis(row, mu, vi) ** 2 for mu in mus) for row in q]
    np.testing.assert_allclose(det.score({"penultimate": torch.from_numpy(q)}).numpy(), want, rtol=1e-10)


def test_knn_score_is_minus_the_kth_smallest_normalised_distance() -> None:
    d = toy()
    det = KNN(k=7).fit(rows(d), K)
    x = d["features"].numpy()
    q = toy(25, seed=6)["features"].numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    want = -np.sort(cdist(unit(q), unit(x)), axis=1)[:, 6]
    np.testing.assert_allclose(det.score({"penultimate": torch.from_numpy(q)}).numpy(), want, atol=1e-7)


def test_knn_chunks_give_the_same_distances_as_one_chunk() -> None:
    d = toy()
    bank = KNN(k=5).fit(rows(d), K).bank
    assert bank is not None
    q = toy(50, seed=7)["features"]
    whole = knn_distance(q, bank, 5, chunk_size=50)
    torch.testing.assert_close(knn_distance(q, bank, 5, chunk_size=7), whole, rtol=0, atol=1e-12)


def test_knn_with_k_above_the_bank_size_says_so() -> None:
    with pytest.raises(DetectorError, match=r"k = 11 exceeds the 10 training features.*shape \(10, 8\)"):
        KNN(k=11).fit(rows(toy(10)), K)


def test_vim_residual_vanishes_on_the_principal_subspace_through_the_origin() -> None:
    d = toy()
    det = ViM(dim=4).fit(rows(d), head(d))
    u = -np.linalg.pinv(d["weight"].numpy()) @ d["bias"].numpy()
    x = d["features"].numpy() - u
    _, vecs = np.linalg.eigh(x.T @ x / len(x))
    top = vecs[:, -4:]  # the 4 principal directions, computed independently
    inside = u + np.random.default_rng(0).normal(size=(10, 4)) @ top.T * 5
    assert det.origin is not None and det.residual_basis is not None
    res = vim_residual(torch.from_numpy(inside), det.origin, det.residual_basis)
    np.testing.assert_allclose(res.numpy(), 0.0, atol=1e-10)


def test_vim_alpha_matches_the_mean_max_logit_over_the_mean_residual() -> None:
    d = toy()
    det = ViM(dim=3).fit(rows(d), head(d))
    u = -np.linalg.pinv(d["weight"].numpy()) @ d["bias"].numpy()
    x = d["features"].numpy() - u
    _, vecs = np.linalg.eigh(x.T @ x / len(x))
    res = np.linalg.norm(x @ vecs[:, :-3], axis=1)  # residual outside the top 3
    alpha = d["logits"].numpy().max(axis=1).mean() / res.mean()
    assert det.alpha is not None and float(det.alpha) == pytest.approx(alpha, rel=1e-10)
    np.testing.assert_allclose(det.score(rows(d)).numpy(),
                               logsumexp(d["logits"].numpy(), axis=1) - alpha * res, rtol=1e-9)


def test_vim_default_dim_follows_the_authors_rule() -> None:
    assert [vim_default_dim(n) for n in (8, 64, 512, 768, 2048)] == [4, 32, 256, 512, 1000]


# ---------------------------------------------------------------------------- every detector
@pytest.mark.parametrize("name", list(REGISTRY))
def test_a_far_cluster_scores_below_in_distribution_samples(name: str) -> None:
    d = toy()
    det = fitted(d)[name]
    assert isinstance(det, REGISTRY[name])
    s_in, s_far = scores(det, toy(60, seed=3)["features"], d), scores(det, far(), d)
    assert s_in.shape == (60,) and s_far.shape == (40,)
    assert s_far.max() < s_in.min()  # higher = in-distribution


@pytest.mark.parametrize("name", list(REGISTRY))
def test_saved_tensors_rebuild_a_detector_with_identical_scores(name: str) -> None:
    d = toy()
    det = fitted(d)[name]
    again = REGISTRY[name].from_tensors(load(save(det.tensors())), **det.options())
    q = torch.cat([toy(20, seed=4)["features"], far(5)])
    torch.testing.assert_close(scores(again, q, d), scores(det, q, d), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_an_unfitted_detector_says_to_fit_it(name: str) -> None:
    d = toy(10)
    with pytest.raises(DetectorError, match=rf"detector '{name}' is not fitted; call \w+\.fit\(\.\.\.\)"):
        scores(REGISTRY[name](), d["features"], d)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_features_of_the_wrong_width_are_refused_with_their_shape(name: str) -> None:
    d = toy()
    det = fitted(d)[name]
    with pytest.raises(DetectorError, match=r"shape \(4, 5\).*F = 8"):
        det.score({"penultimate": torch.zeros(4, 5, dtype=torch.float64), "logits": torch.zeros(4, K, dtype=torch.float64)})


@pytest.mark.parametrize("name", list(REGISTRY))
def test_a_non_finite_feature_row_scores_nan_and_leaves_the_others(name: str) -> None:
    d = toy()
    det = fitted(d)[name]
    q = toy(6, seed=8)["features"]
    bad = q.clone()
    bad[2, 3] = float("nan")
    s, s_bad = scores(det, q, d), scores(det, bad, d)
    assert torch.isnan(s_bad[2]) and not torch.isnan(s).any()
    torch.testing.assert_close(s_bad[[0, 1, 3, 4, 5]], s[[0, 1, 3, 4, 5]], rtol=0, atol=1e-12)


def test_mahalanobis_refuses_a_class_without_training_samples() -> None:
    d = toy(30)
    with pytest.raises(DetectorError, match=r"classes \[3\] have no training samples"):
        MahalanobisFeat().fit(rows(d), K + 1)


def test_vim_refuses_logits_with_another_row_count() -> None:
    d = toy()
    det = fitted(d)["vim"]
    with pytest.raises(DetectorError, match=r"features has shape \(5, 8\) and logits shape \(4, 3\)"):
        det.score({"penultimate": d["features"][:5], "logits": d["logits"][:4]})


def test_rebuilding_names_missing_tensors_and_unknown_options() -> None:
    det = fitted(toy())["knn"]
    with pytest.raises(DetectorError, match=r"missing fitted tensors \['bank'\]"):
        KNN.from_tensors({})
    with pytest.raises(DetectorError, match=r"unknown options \['kk'\]; expected a subset of \['k', 'chunk_size'\]"):
        KNN.from_tensors(det.tensors(), kk=3)
