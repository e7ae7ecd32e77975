"""The detector a model gets when its user has no validation OOD set: the rule of
docs/study-default-detector.md section 4b, fixed on the validation sets of six networks before any
report set was read.

    choice = choose_default(held, train, shuffled, head)  # score dicts: held-out, training, patch-shuffled rows
    choice.detectors.main                                 # the winner, fitted on choice.rows
    choice.threshold_rows                                 # the held-out rows it was not fitted on

Candidates: the fitting rows of ROWS (half A of the held-out rows, the first TRAIN_ROWS training rows,
every training row) x SEARCH (detector, features). Each is scored on half B of the held-out rows
(in-distribution, positive) against the patch-shuffled training rows (nrm.synthetic, SYNTHETIC); the
highest AUROC wins, an exact tie the first in that order. On six networks this pick lost at most
0.002 worst-case AUROC on real validation OOD sets against the best candidate there; choosing on
the other synthetic sets, or on all six, lost up to 0.21. Without a patch-shuffled set: FIXED, the
candidate with the best mean worst-case real-validation AUROC over the six networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nrm.detectors.base import DetectorError, Head, Rows
from nrm.detectors.choose import split_halves, statistics_detector
from nrm.detectors.fitted import FittedDetectors
from nrm.detectors.statistics import StatisticsDetector

ROWS = ("half", "train20k", "train")  # fitting rows, in tie-break order
TRAIN_ROWS = 20_000  # "train20k": a Gaussian on thousands of gate features needs more rows than a held-out half
SEARCH = tuple((name, fs) for name in ("mahalanobis", "mahalanobis_energy", "mahalanobis_energy_robust")
               for fs in ("gates", "gates_acts"))
FIXED = ("train20k", "mahalanobis_energy_robust", "gates_acts")
SYNTHETIC = "patches"  # the nrm.synthetic transform the choice is made on
SYNTHETIC_ROWS = 1000  # it is made from the last training rows, this many


@dataclass(eq=False)
class DefaultChoice:
    """What :func:`choose_default` decided: the detectors (the winner as the main one, its pure NRM
    detector beside a fused winner, the table it was chosen on), the ROWS it was fitted on, and the
    held-out rows it was not fitted on (its threshold's rows)."""

    detectors: FittedDetectors
    rows: str
    threshold_rows: dict[str, Tensor]


def _take(cols: Rows, idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in cols.items()}


def fitting_rows(which: str, held: Rows, train: Rows) -> dict[str, Tensor]:
    """The rows ``which`` (of ROWS) names: half A of ``held``, the first TRAIN_ROWS of ``train``, or all of it."""
    if which == "half":
        return _take(held, split_halves(len(held["pred"]))[0])
    n = len(train["pred"])
    return _take(train, torch.arange(min(TRAIN_ROWS, n) if which == "train20k" else n))


def choose_default(held: Rows, train: Rows, shuffled: Rows | None, head: Head) -> DefaultChoice:
    """The rule (module docstring) on score dicts holding pred, energy, latent_gates and unit_acts:
    ``held`` the held-out rows, ``train`` the training rows, ``shuffled`` the patch-shuffled training
    rows (None: the FIXED candidate). Never pass a test split: this is the choice."""
    from nrm.metrics import auroc

    in_val = _take(held, split_halves(len(held["pred"]))[1])
    if shuffled is None:
        rows, name, fs = FIXED
        winner = statistics_detector(name, fs).fit(fitting_rows(rows, held, train), head)
        table: dict[str, dict[str, float]] = {}
    else:
        best: tuple[float, str, StatisticsDetector] | None = None
        skipped = ""
        table = {}
        for r in ROWS:
            fit_cols = fitting_rows(r, held, train)
            for name, fs in SEARCH:
                try:
                    det = statistics_detector(name, fs, candidate=True).fit(fit_cols, head)
                except DetectorError as e:  # too many features for its covariance on this network
                    skipped = str(e)
                    continue
                a = auroc(det.score(in_val).double().numpy(), det.score(shuffled).double().numpy())
                table[f"{r}:{det.column}"] = {SYNTHETIC: float(a)}
                if best is None or a > best[0]:
                    best = (a, r, det)
        if best is None:
            raise DetectorError(f"no candidate of the default rule fits this network ({skipped}); give --detector "
                                "and --features")
        _, rows, winner = best
        winner.candidate = False
    kept = [statistics_detector(winner.pure, winner.features, candidate=True).fit(fitting_rows(rows, held, train), head)
            ] if winner.pure else []
    threshold_rows = in_val if rows == "half" else dict(held)
    return DefaultChoice(FittedDetectors(winner, candidates=kept, selection=table), rows, threshold_rows)
