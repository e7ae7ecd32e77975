"""Per-sample scores: each a pure tensor function with its formula. Column names are the public contract.

Direction: ``HIGHER_IS_IN[column]`` says whether a higher value means more in-distribution. Every
metric in nrm.metrics takes scores oriented that way; ``nrm.metrics.orient`` flips the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nrm import names

# column -> True if higher = more in-distribution. latent_prior_layers is the per-layer vector of
# latent_prior (same direction per entry).
HIGHER_IS_IN: dict[str, bool] = {
    "latent_prior": True,
    "latent_prior_layers": True,
    "latent_loglik": True,
    "recon_sq_error": False,
    "loglik_bound": True,
    "max_softmax": True,
    "max_logit": True,
    "energy": False,
    # the field's post-hoc baselines on the penultimate features (nrm.detectors), when fitted
    "mahalanobis_feat": True,
    "knn": True,
    "vim": True,
}
# Columns that need the top-down pass (one vector-Jacobian product); the rest of COLUMNS need the forward only.
RENDERED = frozenset({"latent_prior_layers", "latent_prior", "latent_loglik", "recon_sq_error", "loglik_bound"})
# Columns of NRM.score, in output order (fitted det_* detector columns follow). pred is the class index y*.
COLUMNS = list(names.COLUMNS)


def higher_is_in(column: str) -> bool:
    """Whether a higher value of ``column`` means more in-distribution: HIGHER_IS_IN's entry; every
    fitted detector's column (det_*, the baselines) is oriented that way."""
    if column in HIGHER_IS_IN:
        return HIGHER_IS_IN[column]
    if column.startswith(names.DETECTOR_PREFIX) or column in names.POSTHOC:
        return True
    raise ValueError(f"column {column!r} is not a score; expected one of {list(HIGHER_IS_IN)} or det_<detector>")


def latent_prior(eta_layers: Tensor) -> Tensor:
    """eta = sum_l eta_l = sum_l b(l)^T (s(l) . h(l))   (eq. 3, numerator).  (N, L) -> (N,)"""
    return eta_layers.sum(dim=1)


def latent_loglik(latent_prior: Tensor, pred: Tensor, log_partition: Tensor) -> Tensor:
    """log pi(z*|y*) = eta(y*, z*) - log Z(y*)   (eq. 3).  log_partition: (K,) estimate of log Z(y)."""
    return latent_prior - log_partition.to(latent_prior)[pred]


def recon_sq_error(x: Tensor, h0: Tensor) -> Tensor:
    """||x - h(0)||^2, summed over every input value, in normalised input space.  (N, C, H, W) -> (N,)"""
    return (x - h0).pow(2).flatten(1).sum(dim=1)


def loglik_bound(recon_sq_error: Tensor, latent_loglik: Tensor, sigma2: float) -> Tensor:
    """log p(x) >= -||x - h(0)||^2 / (2 sigma^2) + log pi(z*|y*)   (eq. 4, dropping constants)."""
    return -recon_sq_error / (2.0 * sigma2) + latent_loglik


def max_softmax(logits: Tensor) -> Tensor:
    """MSP = max_k softmax(logits)_k (Hendrycks & Gimpel 2017)."""
    return logits.softmax(dim=1).amax(dim=1)


def max_logit(logits: Tensor) -> Tensor:
    """max_k logits_k (Hendrycks et al. 2022)."""
    return logits.amax(dim=1)


def energy(logits: Tensor) -> Tensor:
    """E(x) = -logsumexp_k logits_k (Liu et al. 2020); higher = more OOD."""
    return -torch.logsumexp(logits, dim=1)


def classifier_scores(logits: Tensor) -> dict[str, Tensor]:
    """The columns that need only the forward pass: pred, max_softmax, max_logit, energy."""
    return {
        "pred": logits.argmax(dim=1),
        "max_softmax": max_softmax(logits),
        "max_logit": max_logit(logits),
        "energy": energy(logits),
    }
