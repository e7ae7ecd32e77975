"""The column contract: which columns a scoring run makes, which passes they need, which column flags OOD.

    plan = model.plan(["max_softmax"])      # pred, max_softmax and the threshold column, in output order
    cols = runner.score(x, plan)            # exactly plan.outputs (nrm.runner)
    ood_score, is_ood = plan.flag(cols)     # higher ood_score = more OOD

A model makes the columns of nrm.scores.COLUMNS, then one per fitted detector (``det_*`` on the NRM's
statistics, then the field's baselines; nrm.detectors). Beside the columns a score dict may hold the
detectors' inputs (``INPUTS``), which are not output columns. A plan is decided from the model's config
alone (no weights), so a job's driver can check ``--columns`` before any actor starts; names alone (the
command line at parse time, with no model) are checked by :func:`nrm.names.unknown_columns`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nrm import scores
from nrm.config import ModelConfig, Threshold
from nrm.names import DEFAULT_THRESHOLD_SCORE

# What a score dict may hold beside the columns: the detectors' inputs.
INPUTS = (
    "latent_prior_channels",  # (N, sum_l C_l) eta per channel (top-down pass)
    "latent_gates",  # (N, sum_l C_l) gate on-rates (NRM.unit_stats)
    "unit_acts",  # (N, sum_l C_l) mean positive activations (NRM.unit_stats)
    "penultimate",  # (N, F) the classifier's input
    "logits",  # (N, K)
)
RENDERED = scores.RENDERED | {"latent_prior_channels"}  # entries of the top-down pass
UNIT_STATS = frozenset({"latent_gates", "unit_acts"})  # entries of the unit statistics


class ColumnError(ValueError):
    """Columns a model does not make: ``unknown``, with the ones it makes in ``known``."""

    def __init__(self, unknown: list[str], known: list[str]):
        super().__init__(f"unknown score column(s) {unknown}; this model makes {known}")
        self.unknown, self.known = unknown, known


@dataclass(frozen=True)
class ScorePlan:
    """What one scoring call makes and how: built by :func:`plan_for` (``NRM.plan``), run by
    ``NRM.score`` or ``nrm.runner.Runner.score``, whose dict holds exactly ``outputs``."""

    columns: tuple[str, ...]  # the model columns made, in output order
    inputs: tuple[str, ...] = ()  # detector inputs returned beside them (INPUTS)
    render: bool = True  # whether the top-down pass runs (one backward)
    unit_stats: bool = False  # whether the bottom-up pass reads the unit statistics
    threshold: Threshold | None = None  # the model's fitted threshold

    @property
    def outputs(self) -> tuple[str, ...]:
        """The keys of the score dict: the columns, then the inputs."""
        return (*self.columns, *self.inputs)

    @property
    def threshold_column(self) -> str:
        """The column that decides ``is_ood``: the fitted threshold's score; without one,
        DEFAULT_THRESHOLD_SCORE, which then only ranks ``ood_score``."""
        return self.threshold.score if self.threshold else DEFAULT_THRESHOLD_SCORE

    def flag(self, cols: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(ood_score, is_ood), each (N,), from the threshold column s (higher = in-distribution):

            ood_score = -s                 higher = more OOD
            is_ood    = s < threshold      all False when no threshold is fitted

        A NaN score gives a NaN ood_score and is_ood False."""
        s = cols[self.threshold_column]
        if self.threshold is None:
            return -s, torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        return -s, s < self.threshold.value


def fitted_columns(config: ModelConfig) -> list[str]:
    """The fitted columns of a model, each higher = in-distribution: the detectors on NRM statistics
    (``det_*``), then the field's baselines (nrm.detectors)."""
    det = config.fitted.detector
    return det.columns if det else []


def known_columns(config: ModelConfig) -> list[str]:
    """Every column a model makes, in output order."""
    return [*scores.COLUMNS, *fitted_columns(config)]


def plan_for(config: ModelConfig, columns: Sequence[str] | None = None, inputs: Iterable[str] = (),
         flag: bool = True) -> ScorePlan:
    """The plan for ``columns`` of the model ``config`` describes (None: every column, with the
    detector inputs the passes make). With ``flag`` the columns :meth:`ScorePlan.flag` reads are added
    (pred and the threshold column) and all come in output order; without it, exactly ``columns``,
    in their order. ``inputs`` (of INPUTS) are returned beside them. The passes are the ones these
    columns, their detectors and ``inputs`` need. Raises ColumnError for a column the model does not make."""
    known = known_columns(config)
    threshold = config.fitted.threshold
    if unknown_inputs := [i for i in inputs if i not in INPUTS]:
        raise ValueError(f"unknown detector input(s) {unknown_inputs}; expected some of {list(INPUTS)}")
    if columns is None:
        made = known
    elif unknown := [c for c in columns if c not in known]:
        raise ColumnError(unknown, known)
    elif flag:
        keep = {*columns, "pred", threshold.score if threshold else DEFAULT_THRESHOLD_SCORE}
        made = [c for c in known if c in keep]
    else:
        made = list(columns)
    needs = _needs(config, made, inputs)
    render, unit_stats = bool(needs & RENDERED), bool(needs & UNIT_STATS)
    if columns is None:  # the full table also hands back what its passes made for the detectors
        inputs = [*inputs, *(["latent_prior_channels"] if render else []), *(UNIT_STATS if unit_stats else [])]
    returned = [i for i in INPUTS if i in set(inputs)]
    return ScorePlan(tuple(made), tuple(returned), render, unit_stats, threshold)


def _needs(config: ModelConfig, columns: list[str], inputs: Iterable[str]) -> set[str]:
    """The score-dict entries ``columns`` and ``inputs`` need: themselves and their detectors' inputs."""
    needs = {*columns, *inputs}
    det = config.fitted.detector
    for d in (det.by_column(set(columns)).values() if det else ()):
        needs |= d.inputs()
    return needs
