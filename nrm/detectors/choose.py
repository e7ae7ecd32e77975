"""Choosing a model's detector on validation OOD sets, and the candidates the study compared."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor

from nrm.detectors.base import DetectorError, Rows, lookup
from nrm.detectors.fitted import FittedDetectors
from nrm.detectors.statistics import StatisticsDetector

# What choose() searches by default: every detector of the study that fits in seconds, and the
# gate-statistics Mahalanobis fused with energy (it wins near-OOD on the CIFAR-10 ResNets, docs/results.md §6).
SEARCH = (("mahalanobis", "channels_recon"), ("mahalanobis", "gates"), ("mahalanobis", "gates_acts"),
          ("mahalanobis", "gates_channels_recon"), ("mahalanobis", "layers_recon"),
          ("typicality", "layers"), ("gmm", "channels_recon"),
          ("mahalanobis_energy", "gates"), ("mahalanobis_energy", "gates_acts"))
# The other candidates of the study (docs/results-detectors.md), kept as named scores by nrm.fit.refit(candidates=True).
CANDIDATES = tuple(dict.fromkeys((("typicality", "eta"), ("mahalanobis", "channels"), *SEARCH)))


def statistics_detector(name: str, feature_set: str, candidate: bool = False) -> StatisticsDetector:
    """An unfitted detector on NRM statistics by name; a DetectorError names an unknown one."""
    cls = cast("type[StatisticsDetector]", lookup(name, StatisticsDetector))
    return cls(feature_set, candidate=candidate)


def choose(fit_cols: Rows, in_cols: Rows, ood_cols: dict[str, Rows], n_classes: int,
           search: Iterable[tuple[str, str]] = SEARCH) -> FittedDetectors:
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
    winner: StatisticsDetector | None = None
    fitted: dict[tuple[str, str], StatisticsDetector] = {}
    for name, feature_set in search:
        det = fitted[name, feature_set] = statistics_detector(name, feature_set, candidate=True).fit(fit_cols, n_classes)
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
        kept.append(fitted.get(pure) or statistics_detector(*pure, candidate=True).fit(fit_cols, n_classes))
    return FittedDetectors(winner, candidates=kept, selection=table)


def split_halves(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random split of n held-out samples: (indices to fit the detector on, indices to set
    the threshold / compare on). With n == 1 both halves are that sample."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if n < 2:
        return perm, perm
    return perm[: n // 2], perm[n // 2 :]
