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

from nrm.config import Fitted, Threshold
from nrm.detectors import (
    CANDIDATES,
    KNN,
    BaselineDetector,
    FittedDetectors,
    Head,
    MahalanobisFeat,
    Rows,
    ViM,
    choose,
    gather,
    split_halves,
    statistics_detector,
)
from nrm.detectors.default import DefaultChoice, choose_default
from nrm.metrics import threshold_at_tpr
from nrm.model import NRM
from nrm.names import (
    DEFAULT_DETECTOR,
    DEFAULT_FEATURES,
    DEFAULT_THRESHOLD_SCORE,
    DETECTOR_PREFIX,
    DETECTORS,
    NORMALISERS,
)
from nrm.plan import UNIT_STATS
from nrm.reference import describe
from nrm.runner import Runner, as_runner
from nrm.scores import HIGHER_IS_IN

DEFAULT_NORMALISER = "none"


@torch.no_grad()
def collect(model: NRM | Runner, batches: Iterable[Tensor], render: bool = True) -> dict[str, Tensor]:
    """The full score table of normalised batches (on the model's device), concatenated into CPU
    tensors, with the unit statistics (fitting may choose any feature set); without ``render`` only
    what the forward pass makes of it (pred, energy and the unit statistics: no backward pass). A bare
    model is scored as ``NRM.score`` does, a Runner as it runs (nrm.runner.as_runner); so are the fits below."""
    runner = as_runner(model)
    plan = runner.model.plan(inputs=UNIT_STATS) if render else runner.model.plan(
        ["pred", "energy"], inputs=UNIT_STATS, flag=False)
    cols = gather(runner.score(x, plan) for x in batches)
    if not cols:
        raise ValueError("collect: got no batches")
    return cols


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


def _check_threshold_score(threshold_score: str, detector: str | None) -> None:
    """A ValueError unless ``threshold_score`` is a column where higher = in-distribution that the fit makes."""
    if detector is not None and detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {list(DETECTORS)} or None")
    det_column = DETECTOR_PREFIX + detector if detector is not None else None
    if threshold_score != det_column and (not HIGHER_IS_IN.get(threshold_score) or threshold_score == "latent_prior_layers"):
        ok = [c for c, up in HIGHER_IS_IN.items() if up and c != "latent_prior_layers"]
        ok += [det_column] if det_column else [DETECTOR_PREFIX + "<detector> (with detector=...)"]
        raise ValueError(f"threshold score {threshold_score!r} must be a column where higher = in-distribution: {ok}")


def _rows(cols: Rows, idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in cols.items()}


def fit(
    model: NRM | Runner,
    train_batches: Iterable[Tensor],
    val_batches: Iterable[Tensor],
    normaliser: str = DEFAULT_NORMALISER,
    threshold_score: str = DEFAULT_THRESHOLD_SCORE,
    tpr: float = 0.95,
    detector: str | None = None,
    detector_features: str = DEFAULT_FEATURES,
) -> Fitted:
    """Fit sigma^2 and log Z(y) on ``train_batches`` and the OOD threshold on held-out ``val_batches``
    (both in-distribution, normalised). With ``detector`` (a name in nrm.names.DETECTORS) it is
    fitted on one seeded half of ``val_batches``, and a threshold on its ``det_<name>`` column is set
    on the other half. Installs the result on ``model`` and returns it."""
    _check_threshold_score(threshold_score, detector)
    runner = as_runner(model)
    net = runner.model
    train = collect(runner, train_batches)
    d = net.input_shape[0] * net.input_shape[1] * net.input_shape[2]
    sigma2 = float(train["recon_sq_error"].double().sum() / (train["recon_sq_error"].numel() * d))
    log_z = log_partition(train["latent_prior"], train["pred"], len(net.config.classes), normaliser)
    fitted = Fitted(sigma2=sigma2, log_partition=[float(v) for v in log_z], normaliser=normaliser)
    apply(net, fitted)
    val = collect(runner, val_batches)
    if detector is not None:
        fit_idx, thr_idx = split_halves(len(val["pred"]))
        det = statistics_detector(detector, detector_features).fit(_rows(val, fit_idx), net.head())
        fitted.detector = FittedDetectors(det)
        if threshold_score == det.column:  # the detector's own fitting half would bias its threshold
            val = _rows(val, thr_idx)
        val.update(fitted.detector.score(val))
    fitted.threshold = fit_threshold(threshold_score, val[threshold_score], tpr)
    return fitted


def fit_threshold(score: str, held_out: Tensor, tpr: float) -> Threshold:
    """The threshold on column ``score`` that keeps ``tpr`` of the held-out in-distribution values, with
    their distribution recorded beside it (nrm.reference: what a scheduled audit compares against)."""
    value = float(threshold_at_tpr(held_out.numpy(), tpr))
    return Threshold(score, value, tpr, describe(held_out, value))


def refit(model: NRM | Runner, in_val_batches: Iterable[Tensor], name: str = DEFAULT_DETECTOR,
          feature_set: str = DEFAULT_FEATURES, tpr: float | None = None, candidates: bool = False,
          val_ood: Mapping[str, Iterable[Tensor]] | None = None, fit_batches: Iterable[Tensor] | None = None,
          **options: Any) -> FittedDetectors:
    """(Re)fit detector ``name`` on an existing model from held-out in-distribution batches
    (normalised, never the test split): half of them fit it, the other half set the threshold on
    ``det_<name>`` at the checkpoint's TPR (or ``tpr``). With ``fit_batches`` (in-distribution
    training batches) the detector is fitted on those instead and every held-out batch goes to the
    threshold and the choice: a Gaussian on thousands of gate features needs more rows than a
    held-out half has. With ``val_ood`` ({set name: normalised batches of validation OOD images})
    the detector and features are not given but chosen by :func:`nrm.detectors.choose`, with the
    second half as the in-distribution side. Fitted baselines stay. Installs the detectors and the
    threshold on ``model.config.fitted``; ``nrm.save(model, path)`` then writes them. Returns the
    fitted detectors."""
    main = statistics_detector(name, feature_set)  # an unknown name fails before any batch is scored
    runner = as_runner(model)
    head = runner.model.head()
    half, rest = _fit_and_threshold_rows(runner, in_val_batches, fit_batches)
    if val_ood:
        det = choose(half, rest, {k: collect(runner, b) for k, b in val_ood.items()}, head.n_classes)
    else:
        det = FittedDetectors(main.fit(half, head, **options))
    assert det.main is not None
    if candidates:  # every other candidate as its own named score column, fitted on the same rows
        have = {(d.name, d.features) for d in (det.main, *det.candidates)}
        det.candidates += [statistics_detector(n, f, candidate=True).fit(half, head)
                           for n, f in CANDIDATES if (n, f) not in have]
    _install(runner.model, det, rest, tpr)
    return det


def _install(model: NRM, det: FittedDetectors, threshold_rows: Rows, tpr: float | None) -> None:
    """Make ``det`` the model's detectors (its fitted baselines stay) and set the threshold on the main
    detector's column at ``tpr`` (default: the checkpoint's, else 0.95) on ``threshold_rows``."""
    assert det.main is not None
    fitted = model.config.fitted
    det.baselines = fitted.detector.baselines if fitted.detector else []
    fitted.detector = det
    rate = tpr if tpr is not None else (fitted.threshold.tpr if fitted.threshold else 0.95)
    fitted.threshold = fit_threshold(det.main.column, det.main.score(threshold_rows), rate)


def refit_default(model: NRM | Runner, held_out: Iterable[Tensor], train: Iterable[Tensor],
                  shuffled: Iterable[Tensor] | None, tpr: float | None = None, candidates: bool = False,
                  ) -> DefaultChoice:
    """Fit the detector a user without validation OOD data gets (nrm.detectors.default's rule) from
    normalised batches: the held-out rows (never the test split), the training rows in their order,
    and the patch-shuffled training rows (nrm.synthetic; None: the rule's fixed candidate). The
    training and shuffled rows are scored forward only. With ``candidates`` every other candidate
    detector is kept as its own column, fitted on half A of the held-out rows. Installs the detectors
    and the threshold as :func:`refit` does. Returns the choice."""
    runner = as_runner(model)
    head = runner.model.head()
    held = collect(runner, held_out)
    choice = choose_default(held, collect(runner, train, render=False),
                            collect(runner, shuffled, render=False) if shuffled is not None else None, head)
    det = choice.detectors
    if candidates:
        have = {(d.name, d.features) for d in (det.main, *det.candidates) if d is not None}
        half = _rows(held, split_halves(len(held["pred"]))[0])
        det.candidates += [statistics_detector(n, f, candidate=True).fit(half, head)
                           for n, f in CANDIDATES if (n, f) not in have]
    _install(runner.model, det, choice.threshold_rows, tpr)
    return choice


def _fit_and_threshold_rows(model: Runner, held_out: Iterable[Tensor], fit_batches: Iterable[Tensor] | None,
                            ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(rows a detector is fitted on, rows its threshold is set on): the training batches and every
    held-out row, or the two seeded halves of the held-out rows."""
    cols = collect(model, held_out)
    if fit_batches is not None:
        return collect(model, fit_batches), cols
    fit_idx, thr_idx = split_halves(len(cols["pred"]))
    return _rows(cols, fit_idx), _rows(cols, thr_idx)


def fit_baselines(data: Rows | Iterable[Rows], head: Head, knn_k: int = 50, vim_dim: int | None = None,
                  ) -> list[BaselineDetector]:
    """The field's post-hoc baselines (Mahalanobis on the penultimate features, KNN, ViM) fitted on the
    same in-distribution TRAINING rows (score dicts with ``penultimate``, ``logits`` and the true
    ``label``) for the classifier ``head``."""
    rows = gather(data)
    return [MahalanobisFeat().fit(rows, head), KNN(k=knn_k).fit(rows, head), ViM(dim=vim_dim).fit(rows, head)]


@torch.no_grad()
def fit_posthoc(model: NRM | Runner, batches: Iterable[Tensor], labels: Tensor, knn_k: int = 50,
                vim_dim: int | None = None) -> list[BaselineDetector]:
    """Fit the field's post-hoc baselines (:func:`fit_baselines`) on in-distribution TRAINING batches
    (normalised) with their true ``labels``, and install them beside the model's other detectors
    (``model.config.fitted.detector``); ``nrm.save`` writes their arrays. Returns them."""
    runner = as_runner(model)
    plan = runner.model.plan([], ("penultimate", "logits"), flag=False)  # the forward pass alone
    rows = gather(runner.score(x, plan) for x in batches)
    if not rows:
        raise ValueError("fit_posthoc: got no batches")
    if len(rows["logits"]) != len(labels):
        raise ValueError(f"fit_posthoc: {len(rows['logits'])} images but {len(labels)} labels")
    baselines = fit_baselines({**rows, "label": labels.long().cpu()}, runner.model.head(), knn_k, vim_dim)
    fitted = runner.model.config.fitted
    fitted.detector = fitted.detector or FittedDetectors()
    fitted.detector.baselines = baselines
    return baselines
