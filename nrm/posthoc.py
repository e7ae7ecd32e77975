"""The field's post-hoc OOD detectors on a classifier's penultimate features (issue 14).

They read what any trained classifier already computes for a sample:

    f       (N, F)  the penultimate features, the input of the final linear classifier
    logits  (N, K)  = f W^T + b, with W (K, F) and b (K,) the classifier head

and return a score where HIGHER = MORE IN-DISTRIBUTION (the convention of nrm.metrics, which takes
the in-distribution samples as the positive class):

    mahalanobis_penultimate  s = -min_k (f - mu_k)^T Sigma^-1 (f - mu_k)         Lee et al. 2018
    knn                      s = -|| f/|f| - z_(k) ||  (k-th nearest neighbour)   Sun et al. 2022
    vim                      s = logsumexp(logits) - alpha || P_res (f - u) ||    Wang et al. 2022

Each score is a pure tensor function (:func:`mahalanobis_penultimate`, :func:`knn_distance`,
:func:`vim`); each detector is a small object that fits its state on in-distribution training data,
scores, and hands its fitted state over as ``tensors()`` (a flat dict for safetensors) plus
``options()`` (its JSON-able hyperparameters), so that ``cls.from_tensors(d.tensors(), **d.options())``
rebuilds it. Fitting rejects non-finite features; scoring passes a non-finite feature row through as
a NaN score (a bad row never kills a job). Statistics are fitted and scored in float64; the kNN bank
keeps the dtype it was fitted with (float32 features: half the memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "KNN",
    "REGISTRY",
    "MahalanobisPenultimate",
    "PosthocError",
    "ViM",
    "fit_all",
    "knn_distance",
    "mahalanobis_penultimate",
    "vim",
    "vim_default_dim",
    "vim_residual",
]


class PosthocError(ValueError):
    """A post-hoc detector used unfitted, or given inputs of the wrong shape; the message says what to do."""


# ---------------------------------------------------------------------------- input checks
def _matrix(x: Any, name: str, width: int | None = None, width_name: str = "F") -> Tensor:
    """``x`` as a 2-D floating tensor (N, width), or a PosthocError quoting its shape."""
    if not isinstance(x, Tensor):
        raise PosthocError(f"{name} must be a torch.Tensor of shape (N, {width_name}), got {type(x).__name__}")
    if x.dim() != 2:
        raise PosthocError(f"{name} must have shape (N, {width_name}), got shape {tuple(x.shape)}")
    if width is not None and x.shape[1] != width:
        raise PosthocError(f"{name} has shape {tuple(x.shape)} but the detector expects {width_name} = {width}, "
                           f"i.e. shape (N, {width})")
    if not x.is_floating_point():
        raise PosthocError(f"{name} must be floating point, got dtype {x.dtype}")
    return x


def _finite(x: Tensor, name: str) -> Tensor:
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise PosthocError(f"{name} (shape {tuple(x.shape)}) has {bad} non-finite entries; fit on finite features")
    return x


def _same_rows(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise PosthocError(f"{a_name} has shape {tuple(a.shape)} and {b_name} shape {tuple(b.shape)}: "
                           "expected one row per sample in both")


def _unfitted(cls: str) -> PosthocError:
    return PosthocError(f"{cls} is not fitted; call .fit(...) on in-distribution training data first, "
                        f"or rebuild it with {cls}.from_tensors(saved_tensors, **saved_options)")


def _state(tensors: dict[str, Tensor], cls: str, names: tuple[str, ...], options: dict[str, Any],
           allowed: tuple[str, ...] = ()) -> list[Tensor]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PosthocError(f"{cls}.from_tensors: unknown options {unknown}; expected a subset of {list(allowed)}")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise PosthocError(f"{cls}.from_tensors: missing tensors {missing}; expected {list(names)}, "
                           f"got {sorted(tensors)}")
    return [tensors[n] for n in names]


# ---------------------------------------------------------------------------- scores (pure)
def mahalanobis_penultimate(f: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """Minimum class-conditional Mahalanobis distance, negated (Lee et al. 2018, "A Simple Unified
    Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS):

        s(f) = -min_k (f - mu_k)^T Sigma^-1 (f - mu_k)

    f (N, F), means mu (K, F), precision Sigma^-1 (F, F) -> s (N,). Higher = in-distribution.
    Without the paper's input preprocessing and layer ensemble (OpenOOD's post-hoc variant)."""
    best = torch.full((f.shape[0],), math.inf, dtype=f.dtype, device=f.device)
    for mu in means:  # K passes of (N, F) instead of one (N, K, F) tensor
        d = f - mu  # (N, F)
        best = torch.minimum(best, ((d @ precision) * d).sum(dim=1))
    return -best


def knn_distance(queries: Tensor, bank: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Euclidean distance from each L2-normalised query to its k-th nearest neighbour in ``bank``,
    whose rows must already be L2-normalised (Sun et al. 2022, "Out-of-Distribution Detection with Deep
    Nearest Neighbors", ICML):

        z = f / ||f||,   d_k(z) = || z - b_(k) ||,   ||z - b||^2 = 2 - 2 z.b   (unit vectors)

    queries (N, F), bank (M, F) -> d_k (N,), in the bank's dtype. The queries go ``chunk_size`` at a
    time, so the peak extra memory is about two chunk_size x M similarity matrices (the product and
    topk's work space), not N x M."""
    z = queries.to(bank.dtype)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(z.shape[0], dtype=bank.dtype, device=bank.device)
    for start in range(0, z.shape[0], chunk_size):
        sim = z[start:start + chunk_size] @ bank.T  # (chunk, M) cosine similarities
        kth = sim.topk(k, dim=1).values[:, -1]  # the k-th largest similarity = the k-th nearest neighbour
        out[start:start + chunk_size] = (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()
    return out


def vim_residual(f: Tensor, origin: Tensor, residual_basis: Tensor) -> Tensor:
    """ViM's residual norm ||P_res (f - u)|| = ||(f - u) R||, with R (F, F - D) an orthonormal basis of
    the complement of the principal subspace and u (F,) the origin.  f (N, F) -> (N,)."""
    return ((f - origin) @ residual_basis).norm(dim=1)


def vim(f: Tensor, logits: Tensor, origin: Tensor, residual_basis: Tensor, alpha: Tensor) -> Tensor:
    """Virtual-logit matching (Wang et al. 2022, "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR), as OpenOOD computes it:

        s = logsumexp_k(logit_k) - alpha ||P_res (f - u)||

    i.e. the energy score minus the matched virtual logit. f (N, F), logits (N, K), origin u (F,),
    residual_basis (F, F - D), alpha () -> s (N,). Higher = in-distribution."""
    return torch.logsumexp(logits, dim=1) - alpha * vim_residual(f, origin, residual_basis)


def vim_default_dim(n_features: int) -> int:
    """The principal-subspace dimension D for F features, by the rule of the ViM authors' benchmark
    code (github.com/haoqiwang/vim): D = 1000 if F >= 2048, 512 if F >= 768, else F // 2. OpenOOD's
    ResNet-18 (F = 512) uses D = 256, the same rule; a 64-feature CIFAR ResNet gets D = 32."""
    if n_features >= 2048:
        return 1000
    if n_features >= 768:
        return 512
    return n_features // 2


# ---------------------------------------------------------------------------- detectors
@dataclass(eq=False)
class MahalanobisPenultimate:
    """Lee et al. (2018) on the penultimate features: class means over the TRUE training labels and one
    shared (tied) covariance, score ``-min_k (f - mu_k)^T Sigma^-1 (f - mu_k)``; higher = in-distribution.

    Sigma = 1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T and Sigma^-1 its pseudo-inverse (sklearn's
    EmpiricalCovariance, as Lee et al. and OpenOOD use). ``logits`` are accepted and ignored."""

    means: Tensor | None = None  # (K, F)
    precision: Tensor | None = None  # (F, F)
    name: ClassVar[str] = "mahalanobis_penultimate"
    column: ClassVar[str] = "mahalanobis_feat"
    inputs: ClassVar[tuple[str, ...]] = ("penultimate",)  # the score-dict entries it reads (nrm.plan)

    def fit(self, features: Tensor, labels: Tensor, n_classes: int) -> MahalanobisPenultimate:
        f = _finite(_matrix(features, "features"), "features").double()
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise PosthocError(f"labels must be an integer tensor of shape (N,), got {shape}")
        _same_rows(features, "features", labels, "labels")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise PosthocError(f"labels must lie in 0..{n_classes - 1} (n_classes = {n_classes}), got values in "
                               f"{int(labels.min())}..{int(labels.max())}")
        counts = torch.bincount(labels.long(), minlength=n_classes)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            raise PosthocError(f"classes {empty} have no training samples; every class 0..{n_classes - 1} needs one")
        y = labels.long().to(f.device)
        sums = torch.zeros(n_classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, y, f)
        self.means = sums / counts.to(f)[:, None]  # (K, F)
        centred = f - self.means[y]  # (N, F)
        cov = centred.T @ centred / f.shape[0]  # (F, F)
        self.precision = torch.linalg.pinv(cov, hermitian=True)
        return self

    def score(self, features: Tensor, logits: Tensor | None = None) -> Tensor:
        """s (N,) = -min_k Mahalanobis distance; higher = in-distribution."""
        if self.means is None or self.precision is None:
            raise _unfitted(type(self).__name__)
        f = _matrix(features, "features", self.means.shape[1]).to(self.means)
        return mahalanobis_penultimate(f, self.means, self.precision)

    def tensors(self) -> dict[str, Tensor]:
        if self.means is None or self.precision is None:
            raise _unfitted(type(self).__name__)
        return {"means": self.means, "precision": self.precision}

    def options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **options: Any) -> MahalanobisPenultimate:
        means, precision = _state(tensors, cls.__name__, ("means", "precision"), options)
        return cls(means.double(), precision.double())


@dataclass(eq=False)
class KNN:
    """Sun et al. (2022): the negated distance from the L2-normalised feature to its k-th nearest
    neighbour among the L2-normalised training features; higher = in-distribution.

    k = 50 is the paper's CIFAR-10 choice. OpenOOD and the paper's code report -(squared distance)
    from faiss; the square is monotone, so AUROC and FPR@95 are the same. Queries are scored
    ``chunk_size`` at a time (peak memory chunk_size x bank rows similarities). ``logits`` are ignored."""

    bank: Tensor | None = None  # (M, F), rows of unit length
    k: int = 50
    chunk_size: int = 1024
    name: ClassVar[str] = "knn"
    column: ClassVar[str] = "knn"
    inputs: ClassVar[tuple[str, ...]] = ("penultimate",)

    def __post_init__(self) -> None:
        if self.k < 1 or self.chunk_size < 1:
            raise PosthocError(f"KNN needs k >= 1 and chunk_size >= 1, got k = {self.k}, chunk_size = {self.chunk_size}")
        if self.bank is not None and self.k > self.bank.shape[0]:
            raise PosthocError(f"KNN k = {self.k} exceeds the {self.bank.shape[0]} training features in the bank "
                               f"(shape {tuple(self.bank.shape)}); use k <= {self.bank.shape[0]} or more training data")

    def fit(self, features: Tensor, k: int | None = None) -> KNN:
        f = _finite(_matrix(features, "features"), "features")
        bank = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (M, F), unit rows
        checked = KNN(bank, self.k if k is None else k, self.chunk_size)  # raises before anything changes
        self.bank, self.k = checked.bank, checked.k
        return self

    def score(self, features: Tensor, logits: Tensor | None = None) -> Tensor:
        """s (N,) = -(distance to the k-th nearest training neighbour), float64; higher = in-distribution."""
        if self.bank is None:
            raise _unfitted(type(self).__name__)
        f = _matrix(features, "features", self.bank.shape[1]).to(self.bank.device)
        return -knn_distance(f, self.bank, self.k, self.chunk_size).double()

    def tensors(self) -> dict[str, Tensor]:
        if self.bank is None:
            raise _unfitted(type(self).__name__)
        return {"bank": self.bank}

    def options(self) -> dict[str, Any]:
        return {"k": self.k, "chunk_size": self.chunk_size}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **options: Any) -> KNN:
        (bank,) = _state(tensors, cls.__name__, ("bank",), options, ("k", "chunk_size"))
        return cls(bank, **options)


@dataclass(eq=False)
class ViM:
    """Wang et al. (2022), as OpenOOD fits it; higher = in-distribution.

    Origin u = -pinv(W) b. Principal subspace: the top D eigenvectors of
    Sigma = 1/N sum_i (f_i - u)(f_i - u)^T (the second moment about u); R spans the other F - D.
    alpha = sum_i max_k logit_ik / sum_i ||(f_i - u) R|| on the training data, so the virtual logit
    matches the largest real logit on average. Score: ``logsumexp(logits) - alpha ||(f - u) R||``.
    D defaults to :func:`vim_default_dim` (F // 2 below 768 features) and must lie in 1..F-1."""

    origin: Tensor | None = None  # (F,)
    residual_basis: Tensor | None = None  # (F, F - D)
    alpha: Tensor | None = None  # ()
    name: ClassVar[str] = "vim"
    column: ClassVar[str] = "vim"
    inputs: ClassVar[tuple[str, ...]] = ("penultimate", "logits")

    def fit(self, features: Tensor, logits: Tensor, weight: Tensor, bias: Tensor, dim: int | None = None) -> ViM:
        f = _finite(_matrix(features, "features"), "features").double()
        n_feat = f.shape[1]
        w = _matrix(weight, "weight", n_feat).double().to(f.device)
        lg = _finite(_matrix(logits, "logits", w.shape[0], "K"), "logits").double().to(f.device)
        _same_rows(features, "features", logits, "logits")
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (w.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise PosthocError(f"bias must have shape (K,) = ({w.shape[0]},) to match weight {tuple(w.shape)}, "
                               f"got {shape}")
        dim = vim_default_dim(n_feat) if dim is None else dim
        if not 1 <= dim < n_feat:
            raise PosthocError(f"ViM dim = {dim} must lie in 1..{n_feat - 1} for features of shape {tuple(f.shape)}")
        u = -(torch.linalg.pinv(w) @ bias.double().to(f.device))  # (F,)
        x = f - u  # (N, F)
        _, vecs = torch.linalg.eigh(x.T @ x / f.shape[0])  # ascending eigenvalues
        basis = vecs[:, : n_feat - dim].contiguous()  # (F, F - D): all but the top D
        res = vim_residual(f, u, basis)
        if float(res.sum()) <= 0.0:
            raise PosthocError(f"the training features have no residual outside the {dim}-dim principal subspace; "
                               f"choose a smaller dim")
        self.origin, self.residual_basis = u, basis
        self.alpha = lg.max(dim=1).values.sum() / res.sum()
        return self

    def score(self, features: Tensor, logits: Tensor | None = None) -> Tensor:
        """s (N,) = logsumexp(logits) - alpha * residual norm; higher = in-distribution."""
        if self.origin is None or self.residual_basis is None or self.alpha is None:
            raise _unfitted(type(self).__name__)
        f = _matrix(features, "features", self.origin.shape[0]).to(self.origin)
        if logits is None:
            raise PosthocError("ViM.score needs the logits (N, K) of the same samples as the features")
        lg = _matrix(logits, "logits", None, "K").to(self.origin)
        _same_rows(features, "features", logits, "logits")
        return vim(f, lg, self.origin, self.residual_basis, self.alpha)

    def tensors(self) -> dict[str, Tensor]:
        if self.origin is None or self.residual_basis is None or self.alpha is None:
            raise _unfitted(type(self).__name__)
        return {"origin": self.origin, "residual_basis": self.residual_basis, "alpha": self.alpha.reshape(1)}

    def options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **options: Any) -> ViM:
        origin, basis, alpha = _state(tensors, cls.__name__, ("origin", "residual_basis", "alpha"), options)
        return cls(origin.double(), basis.double(), alpha.double().reshape(()))


REGISTRY: dict[str, type[MahalanobisPenultimate] | type[KNN] | type[ViM]] = {
    MahalanobisPenultimate.name: MahalanobisPenultimate,
    KNN.name: KNN,
    ViM.name: ViM,
}


def fit_all(features: Tensor, logits: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, n_classes: int,
            *, knn_k: int = 50, vim_dim: int | None = None) -> dict[str, MahalanobisPenultimate | KNN | ViM]:
    """Every detector of REGISTRY fitted on the same in-distribution training data: name -> detector.

    features (N, F) penultimate, logits (N, K), labels (N,) true classes, weight (K, F) and bias (K,)
    of the classifier head."""
    return {
        MahalanobisPenultimate.name: MahalanobisPenultimate().fit(features, labels, n_classes),
        KNN.name: KNN().fit(features, k=knn_k),
        ViM.name: ViM().fit(features, logits, weight, bias, dim=vim_dim),
    }
