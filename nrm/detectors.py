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
    mahalanobis_energy  s = z(mahalanobis) + z(-energy)             NOT pure NRM: adds the energy baseline
    gmm          s = log sum_m w_m N(f; m_m, S_m)                   small full-covariance GMM (EM)

Each score is a pure tensor function (:func:`typicality`, :func:`mahalanobis`, :func:`gmm_loglik`,
fitted by :func:`fit_typicality`, ...); each detector is a small object over them (:class:`Typicality`,
:class:`Mahalanobis`, :class:`GMM`; ``REGISTRY`` by name) that fits, scores, raises a DetectorError
naming itself if used unfitted, and hands its fitted state over as ``tensors()`` (float64, for
weights.safetensors) plus ``options()`` (its feature set), like the post-hoc baselines of
nrm.posthoc. ``ModelConfig.fitted.detector`` holds a :class:`FittedDetectors`: the main detector and
any candidates kept beside it; config.json names each one's arrays in weights.safetensors. docs/results-detectors.md
compares them on validation OOD data; ``DEFAULT_DETECTOR`` is the winner there. Given validation OOD
sets, :func:`choose` picks the winner for one checkpoint instead (best worst-case validation AUROC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from nrm.names import DEFAULT_FEATURES, FEATURE_SETS
from nrm.names import DETECTOR_PREFIX as PREFIX

# The score-dict entry behind each part of a feature-set name; "recon" is log ||x - h(0)||^2.
_PARTS = {"eta": "latent_prior", "layers": "latent_prior_layers", "channels": "latent_prior_channels",
          "gates": "latent_gates", "acts": "unit_acts", "recon": "recon_sq_error"}
# From this many features on, mahalanobis scores its quadratic form in float32 (about 4x the speed of
# float64 on AVX-512; a ResNet-56 has 4,064 gate features); tests hold it to the float64 formula at 1e-4.
FAST_DIMS = 512


class DetectorError(ValueError):
    """A detector name, feature set or fitted state that cannot be used; the message says which."""


# ---------------------------------------------------------------------------- features
def _check_features(feature_set: str) -> None:
    if feature_set not in FEATURE_SETS:
        raise DetectorError(f"unknown detector feature set {feature_set!r}; expected one of {list(FEATURE_SETS)}")


def features(cols: dict[str, Tensor], feature_set: str) -> Tensor:
    """The detector input f (N, D), float64, from NRM.score columns (see the module docstring)."""
    _check_features(feature_set)
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


def symmetric_slabs(p: Tensor, block: int = 512) -> list[Tensor]:
    """Symmetric P (D, D) as its upper block rows P[a:b, a:] (blocks of ``block`` rows), the
    off-diagonal blocks doubled, in float32: what :func:`quadratic_form` reads."""
    slabs = []
    for a in range(0, p.shape[0], block):
        b = min(a + block, p.shape[0])
        slab = p[a:b, a:].clone()
        slab[:, b - a :] *= 2
        slabs.append(slab.float().contiguous())
    return slabs


def quadratic_form(d: Tensor, slabs: list[Tensor]) -> Tensor:
    """d^T P d (N,) for d (N, D) and symmetric P given as :func:`symmetric_slabs`: each pair of
    blocks once, (B + 1) / 2B of the full D x D product's flops with B blocks (ResNet-56's 4,064
    gate features: 8 blocks, 48 ms against 80 ms for 512 rows on this CPU, docs/benchmarks.md)."""
    out = d.new_zeros(len(d))
    a = 0
    for slab in slabs:
        b = a + slab.shape[0]
        out += ((d[:, a:b] @ slab) * d[:, a:]).sum(dim=1)
        a = b
    return out


def standardised_sum(parts: Tensor, centre: Tensor, scale: Tensor) -> Tensor:
    """Equal-weight fusion of J scores, each standardised: s = sum_j (p_j - c_j) / d_j.
    parts (N, J), centre and scale (J,)."""
    return ((parts - centre) / scale).sum(dim=1)


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


def fit_gmm(f: Tensor, components: int = 8, iters: int = 100, seed: int = 0, tol: float = 1e-6,
            max_rows: int = 5000) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------- detectors
_D = TypeVar("_D", bound="Detector")
RENDER_PARTS = frozenset({"eta", "layers", "channels", "recon"})  # feature parts that need the top-down pass
UNIT_PARTS = frozenset({"gates", "acts"})  # feature parts read from NRM.unit_stats


@dataclass(eq=False)
class Detector:
    """A fitted detector on NRM statistics (the base of :data:`REGISTRY`): ``fit`` on in-distribution
    NRM.score columns, then ``score`` others, higher = more in-distribution. Its fitted state is
    ``tensors()`` (float64, a flat dict for weights.safetensors) plus ``options()`` (JSON), and
    ``cls.from_tensors(d.tensors(), **d.options())`` rebuilds it. A subclass names its method
    (``name``), its fitted tensors (``keys``, one field each) and the pure functions that fit and score."""

    features: str = DEFAULT_FEATURES  # the feature set f(x) it reads (FEATURE_SETS)
    candidate: bool = field(default=False, kw_only=True)  # kept beside the main detector, not the main one
    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()
    fit_options: ClassVar[tuple[str, ...]] = ()
    pure: ClassVar[str] = ""  # for a detector that adds a non-NRM feature: the pure NRM detector it extends
    # (device, the fitted tensors, their float64 copies there and _derive's): see _on; not saved
    _device_copy: tuple[torch.device, dict[str, Tensor], dict[str, Tensor]] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_features(self.features)

    @property
    def column(self) -> str:
        """Its score column: ``det_<name>``, or ``det_<name>_<features>`` for a candidate."""
        return f"{PREFIX}{self.name}_{self.features}" if self.candidate else PREFIX + self.name

    def parts(self) -> set[str]:
        """The feature parts it reads (eta, layers, channels, gates, acts, recon)."""
        return set(self.features.split("_"))

    def inputs(self) -> set[str]:
        """The score-dict entries it reads: pred and its feature parts' columns (nrm.plan)."""
        return {"pred", *(_PARTS[p] for p in self.parts())}

    def fit(self: _D, cols: dict[str, Tensor], n_classes: int, **options: Any) -> _D:
        """Fit on in-distribution NRM.score columns (``pred`` and the feature parts); returns self."""
        if unknown := sorted(set(options) - set(self.fit_options)):
            raise DetectorError(f"detector {self.name!r}: unknown fit options {unknown}; "
                                f"expected a subset of {list(self.fit_options)}")
        f = features(cols, self.features)
        if len(f) == 0:
            raise DetectorError(f"detector {self.name!r}: no in-distribution samples to fit on")
        for key, value in self._fit(f, cols["pred"].long(), n_classes, **options).items():
            setattr(self, key, value.contiguous())  # safetensors stores only contiguous tensors
        return self

    def score(self, cols: dict[str, Tensor]) -> Tensor:
        """s (N,), float32, higher = more in-distribution, from NRM.score columns."""
        fitted = self.tensors()
        try:
            f = features(cols, self.features)
            s = self._score(f, cols["pred"].long(), self._on(f.device, fitted))
        except (KeyError, IndexError, RuntimeError) as e:
            raise DetectorError(f"detector {self.name!r}: fitted state does not match the score columns ({e})") from None
        return s.float()

    def _on(self, device: torch.device, fitted: dict[str, Tensor]) -> dict[str, Tensor]:
        """``fitted`` (this detector's tensors()) in float64 on ``device``, with what :meth:`_derive`
        adds, made once per fit and device: a GPU would otherwise be sent ResNet-56's 4,064 x 4,064
        precision at every batch."""
        cached = self._device_copy
        if cached is None or cached[0] != device or any(cached[1][k] is not v for k, v in fitted.items()):
            on = {k: v.to(device, torch.float64) for k, v in fitted.items()}
            cached = self._device_copy = (device, fitted, {**on, **self._derive(on)})
        return cached[2]

    def _derive(self, fitted: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors ``_score`` reads that follow from the fitted ones (made once per fit and device)."""
        return {}

    def tensors(self) -> dict[str, Tensor]:
        """The fitted arrays by key (``keys``); a DetectorError if unfitted."""
        fitted = {k: getattr(self, k) for k in self.keys}
        if any(v is None for v in fitted.values()):
            cls = type(self).__name__
            raise DetectorError(f"detector {self.name!r} is not fitted; call {cls}.fit(cols, n_classes) on "
                                f"in-distribution score columns first, or rebuild it with "
                                f"{cls}.from_tensors(saved_tensors, **saved_options)")
        return fitted

    def options(self) -> dict[str, Any]:
        return {"features": self.features}

    @classmethod
    def from_tensors(cls: type[_D], tensors: dict[str, Tensor], *, candidate: bool = False, **options: Any) -> _D:
        """Rebuild a fitted detector from ``tensors()`` and ``options()`` (float lists are accepted too)."""
        if unknown := sorted(set(options) - {"features"}):
            raise DetectorError(f"detector {cls.name!r}: unknown options {unknown}; expected a subset of ['features']")
        if missing := [k for k in cls.keys if k not in tensors]:
            raise DetectorError(f"detector {cls.name!r}: missing fitted arrays {missing}; expected {list(cls.keys)}, "
                                f"got {sorted(tensors)}")
        fitted: dict[str, Any] = {k: torch.as_tensor(tensors[k], dtype=torch.float64).contiguous() for k in cls.keys}
        return cls(**options, **fitted, candidate=candidate)

    def _fit(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def _score(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


@dataclass(eq=False)
class Typicality(Detector):
    """Two-sided typicality per predicted class (after Nalisnick et al. 2019, "Detecting
    Out-of-Distribution Inputs to Deep Generative Models Using Typicality"): :func:`typicality`,

        s = -sum_j |f_j - med[y*, j]| / MAD[y*, j]

    with the median and MAD of :func:`fit_typicality`."""

    median: Tensor | None = None  # (K, D)
    mad: Tensor | None = None  # (K, D)
    name: ClassVar[str] = "typicality"
    keys: ClassVar[tuple[str, ...]] = ("median", "mad")

    def _fit(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        return fit_typicality(f, pred, n_classes)

    def _score(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        return typicality(f, pred, fitted["median"], fitted["mad"])


@dataclass(eq=False)
class Mahalanobis(Detector):
    """Class-conditional Gaussian with a shared covariance at the predicted class (Lee et al. 2018, "A
    Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"):
    :func:`mahalanobis`,

        s = -(f - mu[y*])^T Sigma^-1 (f - mu[y*])

    with the means and precision of :func:`fit_mahalanobis`. From ``FAST_DIMS`` features on, the
    difference is taken in float64 and the quadratic form in float32 (:func:`quadratic_form`)."""

    means: Tensor | None = None  # (K, D)
    precision: Tensor | None = None  # (D, D)
    name: ClassVar[str] = "mahalanobis"
    keys: ClassVar[tuple[str, ...]] = ("means", "precision")

    def _fit(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        return fit_mahalanobis(f, pred, n_classes)

    def _score(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        if f.shape[1] < FAST_DIMS:
            return mahalanobis(f, pred, fitted["means"], fitted["precision"])
        d = (f - fitted["means"][pred]).float()  # (N, D)
        return -quadratic_form(d, [v for k, v in fitted.items() if k.startswith("slab")])  # in order

    def _derive(self, fitted: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"slab{i}": s for i, s in enumerate(symmetric_slabs(fitted["precision"]))}  # float32 slabs


@dataclass(eq=False)
class GMM(Detector):
    """Gaussian mixture density of f, class-agnostic: :func:`gmm_loglik`,

        s = log sum_m w_m N(f; m_m, S_m)

    with a small full-covariance mixture fitted by EM (Dempster, Laird & Rubin 1977; :func:`fit_gmm`,
    whose ``components``, ``iters``, ``seed`` and ``tol`` are its fit options)."""

    weights: Tensor | None = None  # (M,)
    means: Tensor | None = None  # (M, D)
    covs: Tensor | None = None  # (M, D, D)
    name: ClassVar[str] = "gmm"
    keys: ClassVar[tuple[str, ...]] = ("weights", "means", "covs")
    fit_options: ClassVar[tuple[str, ...]] = ("components", "iters", "seed", "tol", "max_rows")

    def _fit(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        return fit_gmm(f, **options)

    def _score(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        return gmm_loglik(f, fitted["weights"], fitted["means"], fitted["covs"])


def _rows(cols: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in cols.items()}


@dataclass(eq=False)
class MahalanobisEnergy(Mahalanobis):
    """:class:`Mahalanobis` on NRM statistics plus the classifier's energy (Liu et al. 2020,
    "Energy-based Out-of-distribution Detection"), with equal weights once each is standardised:

        s = (s_maha - c_1) / d_1 + (-E - c_2) / d_2,       -E = log sum_k exp(logit_k)

    (E is NRM.score's ``energy`` column, higher = more OOD, so -E counts for in-distribution.)

    (c, d) are the mean and standard deviation of the two on in-distribution rows the Gaussian was
    not fitted on (a seeded fifth of the fitting rows; the Gaussian is then refitted on all of them).
    NOT a pure NRM score: energy is one of the field's baselines. The gate statistics see how the
    network computed (which units fired), energy how confident its answer is; near-OOD images that
    fire typical units can still get low-confidence answers, and the reverse (docs/results.md §6).
    :func:`choose` keeps the pure :class:`Mahalanobis` on the same features beside it."""

    centre: Tensor | None = None  # (2,)  c_1, c_2
    scale: Tensor | None = None  # (2,)  d_1, d_2
    name: ClassVar[str] = "mahalanobis_energy"
    keys: ClassVar[tuple[str, ...]] = ("means", "precision", "centre", "scale")
    pure: ClassVar[str] = "mahalanobis"

    def inputs(self) -> set[str]:
        return {*super().inputs(), "energy"}

    def fit(self, cols: dict[str, Tensor], n_classes: int, **options: Any) -> MahalanobisEnergy:
        n = len(cols["pred"])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        cut = n * 4 // 5 if n >= 10 else n
        held = perm[cut:] if cut < n else perm
        self.centre, self.scale = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        super().fit(_rows(cols, perm[:cut]), n_classes, **options)
        parts = self._parts(_rows(cols, held))  # (n_held, 2)
        self.centre = parts.mean(0).contiguous()
        self.scale = (parts.std(0) if len(parts) > 1 else torch.ones(2, dtype=torch.float64)).clamp_min(1e-12).contiguous()
        return super().fit(cols, n_classes, **options)

    def _parts(self, cols: dict[str, Tensor]) -> Tensor:
        """(s_maha, -E) per row: (N, 2), float64, both higher = more in-distribution."""
        if "energy" not in cols:
            raise DetectorError(f"detector {self.name!r}: needs the 'energy' column of NRM.score")
        maha = Mahalanobis.score(self, cols).double()
        return torch.stack([maha, -cols["energy"].double().to(maha.device)], dim=1)

    def score(self, cols: dict[str, Tensor]) -> Tensor:
        fitted = self.tensors()
        parts = self._parts(cols)
        return standardised_sum(parts, fitted["centre"].to(parts.device), fitted["scale"].to(parts.device)).float()


REGISTRY: dict[str, type[Detector]] = {cls.name: cls for cls in (Typicality, Mahalanobis, GMM, MahalanobisEnergy)}
DETECTORS = tuple(REGISTRY)


def lookup(name: str) -> type[Detector]:
    """The detector class registered as ``name``; a DetectorError listing the valid names otherwise."""
    if name not in REGISTRY:
        raise DetectorError(f"unknown detector {name!r}; expected one of {list(REGISTRY)}")
    return REGISTRY[name]


@dataclass(eq=False)
class FittedDetectors:
    """What ``ModelConfig.fitted.detector`` holds: the main detector (column ``det_<name>``, the one a
    threshold uses), the candidates kept beside it (``det_<name>_<features>``) and, when :func:`choose`
    picked the main one, the validation table it was chosen on."""

    main: Detector
    candidates: list[Detector] = field(default_factory=list)
    selection: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate column -> {OOD set: AUROC}

    def by_column(self, want: set[str] | None = None) -> dict[str, Detector]:
        """Score column -> detector, the main one first (only the ``want`` columns, if given)."""
        return {d.column: d for d in (self.main, *self.candidates) if want is None or d.column in want}

    @property
    def columns(self) -> list[str]:
        """The score columns they add to NRM.score."""
        return list(self.by_column())

    def parts(self, want: set[str] | None = None) -> set[str]:
        """The feature parts the (``want``) detectors read."""
        return set().union(*(d.parts() for d in self.by_column(want).values()))

    def needs_unit_stats(self, want: set[str] | None = None) -> bool:
        """Whether the (``want``) detectors read ``latent_gates`` / ``unit_acts``."""
        return bool(self.parts(want) & UNIT_PARTS)

    def needs_rendering(self, want: set[str] | None = None) -> bool:
        """Whether the (``want``) detectors read a column of the top-down pass."""
        return bool(self.parts(want) & RENDER_PARTS)

    def score(self, cols: dict[str, Tensor], want: set[str] | None = None) -> dict[str, Tensor]:
        """``{column: score}`` for every (``want``) detector."""
        return {c: d.score(cols) for c, d in self.by_column(want).items()}


# What choose() searches by default: every detector of the study that fits in seconds, and the
# gate-statistics Mahalanobis fused with energy (issue 14: it wins near-OOD on the CIFAR-10 ResNets).
SEARCH = (("mahalanobis", "channels_recon"), ("mahalanobis", "gates"), ("mahalanobis", "gates_acts"),
          ("mahalanobis", "gates_channels_recon"), ("mahalanobis", "layers_recon"),
          ("typicality", "layers"), ("gmm", "channels_recon"),
          ("mahalanobis_energy", "gates"), ("mahalanobis_energy", "gates_acts"))


def choose(fit_cols: dict[str, Tensor], in_cols: dict[str, Tensor], ood_cols: dict[str, dict[str, Tensor]],
           n_classes: int, search: Iterable[tuple[str, str]] = SEARCH) -> FittedDetectors:
    """Fit every (detector, features) of ``search`` on ``fit_cols`` and keep the one whose worst-case
    AUROC (in-distribution ``in_cols`` positive against each validation OOD set of ``ood_cols``) is
    highest; ties go to the higher mean. Never pass a test split here: this is the choice.
    Returns the winner as the main detector, with ``selection = {candidate column: {set: AUROC}}``;
    a winner that adds a non-NRM feature keeps its pure NRM detector (``pure``) as a candidate."""
    from nrm.metrics import auroc

    if not ood_cols:
        raise DetectorError("choose: no validation OOD sets to choose on")
    table: dict[str, dict[str, float]] = {}
    best: tuple[float, float] | None = None
    winner: Detector | None = None
    fitted: dict[tuple[str, str], Detector] = {}
    for name, feature_set in search:
        det = fitted[name, feature_set] = lookup(name)(feature_set, candidate=True).fit(fit_cols, n_classes)
        pos = det.score(in_cols).double().numpy()
        res = {k: float(auroc(pos, det.score(c).double().numpy())) for k, c in ood_cols.items()}
        table[det.column] = res
        key = (min(res.values()), sum(res.values()) / len(res))
        if best is None or key > best:
            best, winner = key, det
    if winner is None:
        raise DetectorError("choose: no (detector, features) to search")
    winner.candidate = False
    kept = []
    if winner.pure:
        pure = (winner.pure, winner.features)
        kept.append(fitted.get(pure) or lookup(pure[0])(pure[1], candidate=True).fit(fit_cols, n_classes))
    return FittedDetectors(winner, candidates=kept, selection=table)


def split_halves(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random split of n held-out samples: (indices to fit the detector on, indices to set
    the threshold / compare on). With n == 1 both halves are that sample."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if n < 2:
        return perm, perm
    return perm[: n // 2], perm[n // 2 :]


# The other candidates of the study (docs/results-detectors.md), kept as named scores by nrm.fit.refit(candidates=True).
CANDIDATES = tuple(dict.fromkeys((("typicality", "eta"), ("mahalanobis", "channels"), *SEARCH)))
