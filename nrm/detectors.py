"""Fitted OOD detectors on the NRM's per-sample statistics (issue 7).

The latent prior eta alone is one-sided in the wrong way for half of the OOD sets: low-variance
inputs (MNIST under a Fashion-MNIST model) get a small eta, high-variance ones (textures) a large
eta, so "higher eta = in-distribution" fails on the second kind. These detectors instead model the
in-distribution *distribution* of the statistics, fitted on held-out in-distribution data, and score
how typical a sample is: too small and too large are both atypical.

Every detector reads a feature vector f(x) (``FEATURE_SETS``, built by :func:`features`):

    eta           f = (eta,)                                   eta = sum_l eta_l (latent_prior)
    layers        f = (eta_1, ..., eta_L)                      per-layer b(l)^T (s(l) . h(l))
    layers_recon  f = (eta_1, ..., eta_L, log ||x - h(0)||^2)  plus the log reconstruction error
    channels      f = (eta_{l,c}) for every bias layer l and output channel c, where
                  eta_{l,c} = b_c(l) sum_p (s(l) . h(l))_{c,p} and eta_l = sum_c eta_{l,c}
                  (NRM.score's ``latent_prior_channels``; sum_l C_l values)
    channels_recon  channels plus log ||x - h(0)||^2
    gates         f = (g_{l,c}): the on-rate of the ReLU latents s*(l) of channel c over positions,
                  g_{l,c} = mean_p 1[z(l)_{c,p} > 0] (NRM.unit_stats; sum_l C_l values)
    gates_recon   gates plus log ||x - h(0)||^2
    gates_acts    gates plus a_{l,c} = mean_p max(z(l)_{c,p}, 0), the channel's mean activation
    gates_channels_recon  gates, channels and log ||x - h(0)||^2

and returns a score where HIGHER = MORE IN-DISTRIBUTION (column ``det_<name>`` of NRM.score):

    typicality   s = -sum_j |f_j - med[y*, j]| / MAD[y*, j]         two-sided, per predicted class
    mahalanobis  s = -(f - mu[y*])^T Sigma^-1 (f - mu[y*])          class means, shared covariance
    gmm          s = log sum_m w_m N(f; m_m, S_m)                   small full-covariance GMM (EM)

The fitted state is one dict kept in ``ModelConfig.fitted.detector``:
``{"name": ..., "features": ..., "params": {name: float64 tensor}}``; the checkpoint writes the
tensors to weights.safetensors and references them from config.json. docs/results-detectors.md
compares them on validation OOD data; ``DEFAULT_DETECTOR`` is the winner there. Given validation OOD
sets, :func:`choose` picks the winner for one checkpoint instead (best worst-case validation AUROC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

FEATURE_SETS = ("eta", "layers", "layers_recon", "channels", "channels_recon", "gates", "gates_recon", "gates_acts",
                "gates_channels_recon")
# The score-dict entry behind each part of a feature-set name; "recon" is log ||x - h(0)||^2.
_PARTS = {"eta": "latent_prior", "layers": "latent_prior_layers", "channels": "latent_prior_channels",
          "gates": "latent_gates", "acts": "unit_acts", "recon": "recon_sq_error"}
DETECTORS = ("typicality", "mahalanobis", "gmm")
DEFAULT_DETECTOR = "mahalanobis"  # best mean worst-case validation AUROC over checkpoints (docs/results-detectors.md)
DEFAULT_FEATURES = "gates_acts"  # ditto, round 2: 8 checkpoints incl. two CIFAR-10 (round 1: channels_recon)
PREFIX = "det_"
# From this many features on, mahalanobis scores its D x D product in float32 (about 4x the speed of
# float64 on AVX-512; a ResNet-56 has 4,064 gate features): docs/benchmarks.md gives the error.
FAST_DIMS = 512


class DetectorError(ValueError):
    """A detector name, feature set or fitted state that cannot be used; the message says which."""


# ---------------------------------------------------------------------------- features
def features(cols: dict[str, Tensor], feature_set: str) -> Tensor:
    """The detector input f (N, D), float64, from NRM.score columns (see the module docstring)."""
    if feature_set not in FEATURE_SETS:
        raise DetectorError(f"unknown detector feature set {feature_set!r}; expected one of {list(FEATURE_SETS)}")
    parts = []
    for part in feature_set.split("_"):
        v = cols[_PARTS[part]].double()
        if part == "recon":
            v = v.clamp_min(1e-12).log()
        parts.append(v if v.dim() == 2 else v[:, None])  # (N, D_part)
    return torch.cat(parts, dim=1)  # (N, D)


# ---------------------------------------------------------------------------- scores (pure)
def typicality(f: Tensor, pred: Tensor, median: Tensor, mad: Tensor) -> Tensor:
    """Two-sided typicality (after Nalisnick et al. 2019): s = -sum_j |f_j - med[y*, j]| / MAD[y*, j].

    f (N, D), pred (N,) = y*, median and mad (K, D) per class. Both tails count as atypical."""
    return -((f - median[pred]).abs() / mad[pred]).sum(dim=1)


def mahalanobis(f: Tensor, pred: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """Class-conditional Gaussian with shared covariance (Lee et al. 2018), at the predicted class:
    s = -(f - mu[y*])^T Sigma^-1 (f - mu[y*]).  f (N, D), means (K, D), precision (D, D)."""
    d = f - means[pred]  # (N, D)
    return -((d @ precision) * d).sum(dim=1)


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


# ---------------------------------------------------------------------------- fitting
def _per_class(f: Tensor, pred: Tensor, n_classes: int, stat: Callable[[Tensor], Tensor], min_count: int = 2) -> Tensor:
    """stat over the samples predicted as each class (K, ...); a class with < min_count gets the pooled stat."""
    pooled = stat(f)
    return torch.stack([stat(f[pred == k]) if int((pred == k).sum()) >= min_count else pooled
                        for k in range(n_classes)])


def fit_typicality(f: Tensor, pred: Tensor, n_classes: int) -> dict[str, Any]:
    """Per-class median and median absolute deviation of each feature (MAD floored at 1e-6 of the
    pooled MAD, so a constant feature does not divide by zero)."""
    median = _per_class(f, pred, n_classes, lambda a: a.median(dim=0).values)
    mad = _per_class(f, pred, n_classes, lambda a: (a - a.median(dim=0).values).abs().median(dim=0).values)
    floor = (f - f.median(dim=0).values).abs().median(dim=0).values.clamp_min(1e-12) * 1e-6
    return {"median": median, "mad": torch.maximum(mad, floor)}


def fit_mahalanobis(f: Tensor, pred: Tensor, n_classes: int) -> dict[str, Any]:
    """Class means and the inverse of the pooled within-class covariance (ridge 1e-6 of its trace / D)."""
    means = _per_class(f, pred, n_classes, lambda a: a.mean(dim=0), min_count=1)  # (K, D)
    centred = f - means[pred]
    cov = centred.T @ centred / max(1, len(f) - 1)  # (D, D)
    ridge = 1e-6 * float(cov.trace()) / cov.shape[0] + 1e-12
    precision = torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype))
    return {"means": means, "precision": precision}


def fit_gmm(f: Tensor, components: int = 8, iters: int = 100, seed: int = 0, tol: float = 1e-6) -> dict[str, Any]:
    """EM for a full-covariance Gaussian mixture; means initialised by k-means++ seeding, every
    covariance regularised by 1e-3 of the data's per-feature variance (scale-free, never singular)."""
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


# ---------------------------------------------------------------------------- registry
def _check(name: str) -> None:
    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; expected one of {list(DETECTORS)}")


def fit(name: str, cols: dict[str, Tensor], n_classes: int, feature_set: str = DEFAULT_FEATURES,
        **options: Any) -> dict[str, Any]:
    """Fit detector ``name`` on in-distribution NRM.score columns; returns its JSON-serialisable state."""
    _check(name)
    f = features(cols, feature_set)
    if len(f) == 0:
        raise DetectorError(f"detector {name!r}: no in-distribution samples to fit on")
    pred = cols["pred"].long()
    if name == "typicality":
        params = fit_typicality(f, pred, n_classes)
    elif name == "mahalanobis":
        params = fit_mahalanobis(f, pred, n_classes)
    else:
        params = fit_gmm(f, **options)
    return {"name": name, "features": feature_set, "params": params}


RENDER_PARTS = frozenset({"eta", "layers", "channels", "recon"})  # feature parts that need the top-down pass


def states(detector: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Score column -> fitted state: ``det_<name>``, then ``det_<name>_<features>`` for each fitted
    candidate kept beside it (``detector["candidates"]``); {} when nothing is fitted."""
    if not detector:
        return {}
    _check(detector.get("name", ""))
    return {PREFIX + detector["name"]: detector, **{candidate_column(c): c for c in detector.get("candidates", [])}}


def parts(state: dict[str, Any]) -> set[str]:
    """The feature parts a fitted state reads (eta, layers, channels, gates, acts, recon)."""
    return set(state.get("features", "").split("_")) - {""}


def needs_unit_stats(detector: dict[str, Any], want: set[str] | None = None) -> bool:
    """Whether the fitted detector (or a candidate kept beside it; only the ``want`` columns, if given)
    reads ``latent_gates`` / ``unit_acts``."""
    return any(parts(st) & {"gates", "acts"} for c, st in states(detector).items() if want is None or c in want)


def column_names(detector: dict[str, Any]) -> list[str]:
    """The score columns a fitted detector adds (see :func:`states`)."""
    return list(states(detector))


def candidate_column(candidate: dict[str, Any]) -> str:
    _check(candidate.get("name", ""))
    return f"{PREFIX}{candidate['name']}_{candidate['features']}"


def _tensors(params: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float64).to(device) for k, v in params.items()}


def score(detector: dict[str, Any], cols: dict[str, Tensor]) -> Tensor:
    """The detector's score (N,), higher = more in-distribution, from NRM.score columns."""
    name = detector.get("name", "")
    _check(name)
    try:
        f, p = features(cols, detector["features"]), detector["params"]
        t = _tensors(p, f.device)
        pred = cols["pred"].long()
        if name == "typicality":
            s = typicality(f, pred, t["median"], t["mad"])
        elif name == "mahalanobis" and f.shape[1] >= FAST_DIMS:
            d = (f - t["means"][pred]).float()  # the difference in float64, the D x D product in float32
            s = -((d @ t["precision"].float()) * d).sum(dim=1)
        elif name == "mahalanobis":
            s = mahalanobis(f, pred, t["means"], t["precision"])
        else:
            s = gmm_loglik(f, t["weights"], t["means"], t["covs"])
    except (KeyError, IndexError, RuntimeError) as e:
        raise DetectorError(f"detector {name!r}: fitted state does not match the score columns ({e})") from None
    return s.float()


def score_columns(detector: dict[str, Any], cols: dict[str, Tensor], want: set[str] | None = None) -> dict[str, Tensor]:
    """``{column: score}`` for every fitted state of :func:`states` (only the ``want`` columns, if given)."""
    return {c: score(st, cols) for c, st in states(detector).items() if want is None or c in want}


# What choose() searches by default: every detector of the study that fits in seconds.
SEARCH = (("mahalanobis", "channels_recon"), ("mahalanobis", "gates"), ("mahalanobis", "gates_acts"),
          ("mahalanobis", "gates_channels_recon"), ("mahalanobis", "layers_recon"),
          ("typicality", "layers"), ("gmm", "channels_recon"))


def choose(fit_cols: dict[str, Tensor], in_cols: dict[str, Tensor], ood_cols: dict[str, dict[str, Tensor]],
           n_classes: int, search: Iterable[tuple[str, str]] = SEARCH) -> dict[str, Any]:
    """Fit every (detector, features) of ``search`` on ``fit_cols`` and keep the one whose worst-case
    AUROC (in-distribution ``in_cols`` positive against each validation OOD set of ``ood_cols``) is
    highest; ties go to the higher mean. Never pass a test split here: this is the choice.
    Returns the winner's state with ``"selection": {candidate column: {set: AUROC}}`` added."""
    from nrm.metrics import auroc

    if not ood_cols:
        raise DetectorError("choose: no validation OOD sets to choose on")
    table: dict[str, dict[str, float]] = {}
    best: tuple[float, float] | None = None
    winner: dict[str, Any] = {}
    for name, feature_set in search:
        state = fit(name, fit_cols, n_classes, feature_set)
        pos = score(state, in_cols).double().numpy()
        res = {k: float(auroc(pos, score(state, c).double().numpy())) for k, c in ood_cols.items()}
        table[candidate_column(state)] = res
        key = (min(res.values()), sum(res.values()) / len(res))
        if best is None or key > best:
            best, winner = key, state
    return {**winner, "selection": table}


def split_halves(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random split of n held-out samples: (indices to fit the detector on, indices to set
    the threshold / compare on). With n == 1 both halves are that sample."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if n < 2:
        return perm, perm
    return perm[: n // 2], perm[n // 2 :]


# The other candidates of the study (docs/results-detectors.md), kept as named scores by nrm.fit.refit(candidates=True).
CANDIDATES = tuple(dict.fromkeys((("typicality", "eta"), ("mahalanobis", "channels"), *SEARCH)))
