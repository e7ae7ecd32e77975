"""Fitting the NRM's state on in-distribution data: sigma^2, the normaliser log Z(y), the threshold.

The normaliser Z(y) = sum_z exp(eta(y, z)) sums over every latent configuration and has no closed
form (the seed leaves it open). Estimators, all from in-distribution training samples whose
prediction is y (eta_i = latent_prior of sample i):

- ``none``: log Z(y) = 0, i.e. latent_loglik = latent_prior.
- ``class_mean``: log Z(y) = mean_i eta_i. Moment matching: centres each class's eta at zero, so
  classes whose templates are large (large eta) do not look more typical than small ones.
- ``harmonic``: log Z(y) = -log mean_i exp(-eta_i) + const. For z ~ pi(z|y) = exp(eta) / Z,
  E[exp(-eta)] = |Z-space| / Z(y), so this is the harmonic-mean estimator of log Z(y) up to the
  class-independent constant log |Z-space|, which no ranking depends on.

docs/results.md records which one separates OOD data best on a validation split; DEFAULT_NORMALISER
is that one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from nrm import detectors as D
from nrm import names
from nrm import posthoc as P
from nrm import scores as S
from nrm.config import Fitted, Threshold
from nrm.metrics import threshold_at_tpr
from nrm.model import NRM
from nrm.names import NORMALISERS
from nrm.reference import describe

DEFAULT_NORMALISER = "none"
DEFAULT_THRESHOLD_SCORE = "latent_loglik"


@torch.no_grad()
def collect(model: NRM, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Concatenate ``model.score`` over normalised batches (on the model's device) into CPU tensors, with
    every detector input (``unit_stats=True``), since fitting may choose any feature set."""
    parts: dict[str, list[Tensor]] = {}
    for x in batches:
        for k, v in model.score(x, unit_stats=True).items():
            parts.setdefault(k, []).append(v.cpu())
    if not parts:
        raise ValueError("collect: got no batches")
    return {k: torch.cat(v) for k, v in parts.items()}


def log_partition(eta: Tensor, pred: Tensor, n_classes: int, method: str) -> Tensor:
    """Estimate log Z(y) for y = 0..n_classes-1 from in-distribution latent priors ``eta`` (N,) and
    predictions ``pred`` (N,); a class with no sample gets the estimate over all samples."""
    if method not in NORMALISERS:
        raise ValueError(f"unknown normaliser {method!r}; expected one of {NORMALISERS}")
    eta = eta.double()
    if method == "none":
        return torch.zeros(n_classes, dtype=torch.float64)

    def estimate(e: Tensor) -> Tensor:
        if method == "class_mean":
            return e.mean()
        return -(torch.logsumexp(-e, 0) - torch.log(torch.tensor(float(e.numel()), dtype=e.dtype)))

    overall = estimate(eta)
    return torch.stack([estimate(eta[pred == y]) if (pred == y).any() else overall for y in range(n_classes)])


def apply(model: NRM, fitted: Fitted) -> None:
    """Install fitted state on a model (config and the log_partition buffer)."""
    model.config.fitted = fitted
    model.log_partition = torch.tensor(fitted.log_partition, dtype=torch.float32, device=model.mean.device)


def fit(
    model: NRM,
    train_batches: Iterable[Tensor],
    val_batches: Iterable[Tensor],
    normaliser: str = DEFAULT_NORMALISER,
    threshold_score: str = DEFAULT_THRESHOLD_SCORE,
    tpr: float = 0.95,
    detector: str | None = None,
    detector_features: str = D.DEFAULT_FEATURES,
) -> Fitted:
    """Fit sigma^2 and log Z(y) on ``train_batches`` and the OOD threshold on held-out ``val_batches``
    (both in-distribution, normalised). With ``detector`` (a name in nrm.detectors.DETECTORS) it is
    fitted on one seeded half of ``val_batches``, and a threshold on its ``det_<name>`` column is set
    on the other half. Installs the result on ``model`` and returns it."""
    if detector is not None and detector not in D.DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {list(D.DETECTORS)} or None")
    det_column = D.PREFIX + detector if detector is not None else None
    if threshold_score != det_column and (threshold_score not in S.HIGHER_IS_IN or not S.HIGHER_IS_IN[threshold_score]
                                          or threshold_score == "latent_prior_layers"):
        ok = [c for c, up in S.HIGHER_IS_IN.items() if up and c != "latent_prior_layers"]
        ok += [det_column] if det_column else [D.PREFIX + "<detector> (with detector=...)"]
        raise ValueError(f"threshold score {threshold_score!r} must be a column where higher = in-distribution: {ok}")
    train = collect(model, train_batches)
    d = model.input_shape[0] * model.input_shape[1] * model.input_shape[2]
    sigma2 = float(train["recon_sq_error"].double().sum() / (train["recon_sq_error"].numel() * d))
    log_z = log_partition(train["latent_prior"], train["pred"], len(model.config.classes), normaliser)
    fitted = Fitted(sigma2=sigma2, log_partition=[float(v) for v in log_z], normaliser=normaliser)
    apply(model, fitted)
    val = collect(model, val_batches)
    if detector is not None:
        fit_idx, thr_idx = D.split_halves(len(val["pred"]))
        det = D.lookup(detector)(detector_features).fit({k: v[fit_idx] for k, v in val.items()},
                                                        len(model.config.classes))
        fitted.detector = D.FittedDetectors(det)
        if threshold_score == det_column:  # the detector's own fitting half would bias its threshold
            val = {k: v[thr_idx] for k, v in val.items()}
        val.update(fitted.detector.score(val))
    fitted.threshold = fit_threshold(threshold_score, val[threshold_score], tpr)
    return fitted


def fit_threshold(score: str, held_out: Tensor, tpr: float) -> Threshold:
    """The threshold on column ``score`` that keeps ``tpr`` of the held-out in-distribution values, with
    their distribution recorded beside it (nrm.reference: what a scheduled audit compares against)."""
    value = float(threshold_at_tpr(held_out.numpy(), tpr))
    return Threshold(score, value, tpr, describe(held_out, value))


def refit(model: NRM, in_val_batches: Iterable[Tensor], name: str = names.DEFAULT_DETECTOR,
          feature_set: str = D.DEFAULT_FEATURES, tpr: float | None = None, candidates: bool = False,
          val_ood: Mapping[str, Iterable[Tensor]] | None = None, fit_batches: Iterable[Tensor] | None = None,
          **options: Any) -> D.FittedDetectors:
    """(Re)fit detector ``name`` on an existing model from held-out in-distribution batches
    (normalised, never the test split): half of them fit it, the other half set the threshold on
    ``det_<name>`` at the checkpoint's TPR (or ``tpr``). With ``fit_batches`` (in-distribution
    training batches) the detector is fitted on those instead and every held-out batch goes to the
    threshold and the choice: a Gaussian on thousands of gate features needs more rows than a
    held-out half has. With ``val_ood`` ({set name: normalised
    batches of validation OOD images}) the detector and features are not given but chosen by
    :func:`nrm.detectors.choose`, with the second half as the in-distribution side. Installs both on ``model.config.fitted``;
    ``nrm.save(model, path)`` then writes them. Returns the fitted detectors."""
    D.lookup(name)  # an unknown name fails before any batch is scored
    cols = collect(model, in_val_batches)
    if fit_batches is not None:
        half, rest = collect(model, fit_batches), cols
    else:
        fit_idx, thr_idx = D.split_halves(len(cols["pred"]))
        half = {k: v[fit_idx] for k, v in cols.items()}
        rest = {k: v[thr_idx] for k, v in cols.items()}
    if val_ood:
        ood = {k: collect(model, b) for k, b in val_ood.items()}
        det = D.choose(half, rest, ood, len(model.config.classes))
        name, feature_set = det.main.name, det.main.features
    else:
        det = D.FittedDetectors(D.lookup(name)(feature_set).fit(half, len(model.config.classes), **options))
    if candidates:  # every other candidate as its own named score column, fitted on the same rows
        have = {(d.name, d.features) for d in (det.main, *det.candidates)}
        det.candidates += [D.lookup(n)(f, candidate=True).fit(half, len(model.config.classes))
                           for n, f in D.CANDIDATES if (n, f) not in have]
    fitted = model.config.fitted
    fitted.detector = det
    old = fitted.threshold
    rate = tpr if tpr is not None else (old.tpr if old else 0.95)
    held = det.main.score(rest)
    fitted.threshold = fit_threshold(D.PREFIX + name, held, rate)
    return det


@torch.no_grad()
def fit_posthoc(model: NRM, batches: Iterable[Tensor], labels: Tensor, knn_k: int = 50,
                vim_dim: int | None = None) -> dict[str, Any]:
    """Fit the field's post-hoc baselines (nrm.posthoc: Mahalanobis on the penultimate features,
    KNN, ViM) on in-distribution TRAINING batches (normalised) with their true ``labels``, and
    install them on ``model.config.fitted.posthoc``; ``nrm.save`` writes their arrays. Returns them."""
    feats, logits = zip(*(model.penultimate(x) for x in batches), strict=True)
    f, lg = torch.cat(feats).cpu(), torch.cat(logits).cpu()
    if len(f) != len(labels):
        raise ValueError(f"fit_posthoc: {len(f)} images but {len(labels)} labels")
    head = model.node_params(model.classifier.name)
    weight = head["weight"].detach().double().cpu()
    bias = head.get("bias", torch.zeros(weight.shape[0])).detach().double().cpu()
    fitted = P.fit_all(f, lg, labels.long().cpu(), weight, bias, len(model.config.classes), knn_k=knn_k, vim_dim=vim_dim)
    model.config.fitted.posthoc = dict(fitted)
    return model.config.fitted.posthoc
