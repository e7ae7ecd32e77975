"""Virtual-logit matching on the penultimate features and logits (column ``vim``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.base import DetectorError, Head, Rows
from nrm.detectors.baseline import BaselineDetector, finite, matrix, same_rows


def vim_residual(f: Tensor, origin: Tensor, residual_basis: Tensor) -> Tensor:
    """ViM's residual norm ||P_res (f - u)|| = ||(f - u) R||, with R (F, F - D) an orthonormal basis of
    the complement of the principal subspace and u (F,) the origin.  f (N, F) -> (N,)."""
    return ((f - origin) @ residual_basis).norm(dim=1)


def vim(f: Tensor, logits: Tensor, origin: Tensor, residual_basis: Tensor, alpha: Tensor) -> Tensor:
    """Virtual-logit matching (Wang et al. 2022, "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR), as OpenOOD computes it:

        s = logsumexp_k(logit_k) - alpha ||P_res (f - u)||

    i.e. the energy score minus the matched virtual logit. f (N, F), logits (N, K), origin u (F,),
    residual_basis (F, F - D), alpha (1,) -> s (N,). Higher = in-distribution."""
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


def _head(head: Head, n_feat: int) -> tuple[Tensor, Tensor]:
    """The head's weight (K, F) and bias (K,) in float64, checked against F features."""
    if head.weight is None or head.bias is None:
        raise DetectorError("ViM needs the classifier's weight and bias: fit it with Head(n_classes, weight, bias) "
                            "(NRM.head())")
    w = matrix(head.weight, "weight", n_feat).double()
    if tuple(head.bias.shape) != (w.shape[0],):
        raise DetectorError(f"bias must have shape (K,) = ({w.shape[0]},) to match weight {tuple(w.shape)}, "
                            f"got {tuple(head.bias.shape)}")
    return w, head.bias.double()


@dataclass(eq=False)
class ViM(BaselineDetector):
    """Wang et al. (2022), as OpenOOD fits it; higher = in-distribution.

    Origin u = -pinv(W) b. Principal subspace: the top D eigenvectors of
    Sigma = 1/N sum_i (f_i - u)(f_i - u)^T (the second moment about u); R spans the other F - D.
    alpha = sum_i max_k logit_ik / sum_i ||(f_i - u) R|| on the training data, so the virtual logit
    matches the largest real logit on average. Score: :func:`vim`. D (``dim``) defaults to
    :func:`vim_default_dim` (F // 2 below 768 features) and must lie in 1..F-1."""

    origin: Tensor | None = None  # (F,)
    residual_basis: Tensor | None = None  # (F, F - D)
    alpha: Tensor | None = None  # (1,)
    dim: int | None = None  # D; None: vim_default_dim, recorded at fitting
    name: ClassVar[str] = "vim"
    keys: ClassVar[tuple[str, ...]] = ("origin", "residual_basis", "alpha")

    def inputs(self) -> set[str]:
        return {"penultimate", "logits"}

    def _fit(self, rows: dict[str, Tensor], head: Head, **options: Any) -> dict[str, Tensor]:
        f = finite(matrix(rows["penultimate"], "features"), "features").double()
        n_feat = f.shape[1]
        w, b = _head(head, n_feat)
        lg = finite(matrix(rows["logits"], "logits", w.shape[0], "K"), "logits").double()
        same_rows(f, "features", lg, "logits")
        dim = vim_default_dim(n_feat) if self.dim is None else self.dim
        if not 1 <= dim < n_feat:
            raise DetectorError(f"ViM dim = {dim} must lie in 1..{n_feat - 1} for features of shape {tuple(f.shape)}")
        u = -(torch.linalg.pinv(w) @ b)  # (F,)
        x = f - u  # (N, F)
        _, vecs = torch.linalg.eigh(x.T @ x / f.shape[0])  # ascending eigenvalues
        basis = vecs[:, : n_feat - dim].contiguous()  # (F, F - D): all but the top D
        res = vim_residual(f, u, basis)
        if float(res.sum()) <= 0.0:
            raise DetectorError(f"the training features have no residual outside the {dim}-dim principal subspace; "
                                "choose a smaller dim")
        self.dim = dim
        return {"origin": u, "residual_basis": basis, "alpha": (lg.max(dim=1).values.sum() / res.sum()).reshape(1)}

    def score(self, cols: Rows) -> Tensor:
        """s (N,) float64 = logsumexp(logits) - alpha * residual norm; higher = in-distribution."""
        t = self.tensors()
        f = matrix(cols["penultimate"], "features", t["origin"].shape[0]).to(t["origin"])
        if "logits" not in cols:
            raise DetectorError("ViM.score needs the logits (N, K) of the same samples as the features")
        lg = matrix(cols["logits"], "logits", None, "K").to(t["origin"])
        same_rows(f, "features", lg, "logits")
        return vim(f, lg, t["origin"], t["residual_basis"], t["alpha"])
