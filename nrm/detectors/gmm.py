"""A Gaussian mixture density of the NRM statistics, class-agnostic (column ``det_gmm``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.statistics import StatisticsDetector


def _gmm_terms(f: Tensor, weights: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """log w_m + log N(f_i; m_m, S_m) for every component m and sample i: (M, N)."""
    chol = torch.linalg.cholesky(covs)  # (M, D, D)
    diff = (f[None] - means[:, None]).transpose(1, 2)  # (M, D, N)
    z = torch.linalg.solve_triangular(chol, diff, upper=False)  # (M, D, N): L_m^-1 (f - m_m)
    log_det = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # (M,)
    log_n = -0.5 * (z.pow(2).sum(1) + log_det[:, None] + f.shape[1] * math.log(2 * math.pi))  # (M, N)
    return log_n + weights.log()[:, None]


def gmm_loglik(f: Tensor, weights: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """Gaussian mixture log-density s = log sum_m w_m N(f; m_m, S_m).
    f (N, D), weights (M,), means (M, D), covs (M, D, D)."""
    return torch.logsumexp(_gmm_terms(f, weights, means, covs), dim=0)  # (N,)


def fit_gmm(f: Tensor, components: int = 8, iters: int = 100, seed: int = 0, tol: float = 1e-6,
            max_rows: int = 5000) -> dict[str, Tensor]:
    """EM for a full-covariance Gaussian mixture; means initialised by k-means++ seeding, every
    covariance regularised by 1e-3 of the data's per-feature variance (scale-free, never singular).
    EM sees at most ``max_rows`` rows (a seeded sample): its cost grows with rows x components x D^2."""
    if len(f) > max_rows:
        f = f[torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))[:max_rows]]
    n, d = f.shape
    m = max(1, min(components, n // max(2 * d, 1)))  # at least ~2D samples per component
    gen = torch.Generator().manual_seed(seed)
    reg = torch.diag(f.var(dim=0).clamp_min(1e-12) * 1e-3) if n > 1 else torch.eye(d, dtype=f.dtype) * 1e-6
    means = f[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, m):  # k-means++: next centre with probability proportional to squared distance
        dist = torch.cdist(f, means).amin(dim=1).pow(2)
        p = dist / dist.sum() if float(dist.sum()) > 0 else torch.full_like(dist, 1.0 / n)
        means = torch.cat([means, f[torch.multinomial(p.float(), 1, generator=gen)]])
    cov0 = (torch.cov(f.T).reshape(d, d) if n > 1 else torch.zeros(d, d, dtype=f.dtype)) + reg
    covs, weights = cov0.expand(m, d, d).clone(), torch.full((m,), 1.0 / m, dtype=f.dtype)
    prev = -math.inf
    for _ in range(iters):
        comp = _gmm_terms(f, weights, means, covs)  # (M, N)
        total = torch.logsumexp(comp, dim=0)  # (N,)
        resp = (comp - total).exp()  # (M, N) E step
        nk = resp.sum(dim=1).clamp_min(1e-10)  # (M,)
        weights = nk / n
        means = resp @ f / nk[:, None]
        diffs = f[None] - means[:, None]  # (M, N, D)
        covs = torch.einsum("mn,mnd,mne->mde", resp, diffs, diffs) / nk[:, None, None] + reg
        ll = float(total.mean())
        if ll - prev < tol * max(1.0, abs(ll)):
            break
        prev = ll
    return {"weights": weights, "means": means, "covs": covs}


@dataclass(eq=False)
class GMM(StatisticsDetector):
    """Gaussian mixture density of f, class-agnostic: :func:`gmm_loglik`,

        s = log sum_m w_m N(f; m_m, S_m)

    with a small full-covariance mixture fitted by EM (Dempster, Laird & Rubin 1977; :func:`fit_gmm`,
    whose ``components``, ``iters``, ``seed``, ``tol`` and ``max_rows`` are its fit options)."""

    weights: Tensor | None = None  # (M,)
    means: Tensor | None = None  # (M, D)
    covs: Tensor | None = None  # (M, D, D)
    name: ClassVar[str] = "gmm"
    dense: ClassVar[bool] = True
    keys: ClassVar[tuple[str, ...]] = ("weights", "means", "covs")
    fit_options: ClassVar[tuple[str, ...]] = ("components", "iters", "seed", "tol", "max_rows")

    def _fit_features(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        return fit_gmm(f, **options)

    def _score_features(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        return gmm_loglik(f, fitted["weights"], fitted["means"], fitted["covs"])
