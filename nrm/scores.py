"""Per-sample scores: each a pure tensor function with its formula. Column names are the public contract.

Direction: ``HIGHER_IS_IN[column]`` says whether a higher value means more in-distribution. Every
metric in nrm.metrics takes scores oriented that way; ``nrm.metrics.orient`` flips the others.
"""

from __future__ import annotations

import math

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


def unit_stats(z: Tensor, positive: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel statistics of one bias node's output z(l), (N, C, H, W) or (N, F), over positions p:

        gate rate  g_{l,c} = mean_p 1[z(l)_{c,p} > 0]       the ReLU latents s*(l), as on-rates
        act mean   a_{l,c} = mean_p max(z(l)_{c,p}, 0)      the positive part of the activation

    both (N, C), float32; from max(z, 0) itself when ``positive`` (a ReLU's output: read, not written).
    Both come from one positive part: its sum, then its sign (= the gate), which is cheaper than
    summing the boolean 1[z > 0] (docs/benchmarks.md)."""
    dims = tuple(range(2, z.dim()))  # positions; () for linear features (P = 1)
    p = math.prod(z.shape[2:])
    pos = z.detach() if positive else z.detach().clamp_min(0)  # (N, C, ...) max(z, 0)
    mean = _sum32(pos, dims) / p if dims else pos.to(torch.float32, copy=True)
    gate = torch.sign(pos) if positive else pos.sign_()  # 1[z > 0]
    return (_sum32(gate, dims) / p if dims else gate.float()), mean


def _sum32(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Float32 sums over ``dims``. A bf16 map is summed in its own dtype (torch accumulates in
    float32 and rounds the sum once, 2^-9 relative) and then widened: ``sum(dtype=float32)`` first
    copies the whole map to float32, which costs bf16 scoring more than its sums (docs/benchmarks.md).
    fp16 keeps the float32 sum: a sum of 1,024 activations can pass fp16's largest value."""
    if t.dtype == torch.bfloat16:
        return t.sum(dim=dims).float()
    return t.sum(dim=dims, dtype=torch.float32)
