"""What a model holds of its detectors (``ModelConfig.fitted.detector``), and how a checkpoint stores them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from nrm.detectors.base import Detector, Rows
from nrm.detectors.baseline import BaselineDetector
from nrm.detectors.statistics import StatisticsDetector


@dataclass(eq=False)
class FittedDetectors:
    """Every fitted detector of a model, in column order: the main detector on NRM statistics (column
    ``det_<name>``, the one a threshold uses), the candidates kept beside it (``det_<name>_<features>``),
    the field's baselines (their own columns); and, when ``nrm.detectors.choose`` picked the main one,
    the validation table it was chosen on."""

    main: StatisticsDetector | None = None
    candidates: list[StatisticsDetector] = field(default_factory=list)
    baselines: list[BaselineDetector] = field(default_factory=list)
    selection: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate column -> {OOD set: AUROC}

    @property
    def all(self) -> list[Detector]:
        return [*([self.main] if self.main else []), *self.candidates, *self.baselines]

    def by_column(self, want: set[str] | None = None) -> dict[str, Detector]:
        """Score column -> detector, in column order (only the ``want`` columns, if given)."""
        return {d.column: d for d in self.all if want is None or d.column in want}

    @property
    def columns(self) -> list[str]:
        """The score columns they add to NRM.score."""
        return list(self.by_column())

    def score(self, cols: Rows, want: set[str] | None = None) -> dict[str, Tensor]:
        """``{column: score}``, float32, for every (``want``) detector."""
        return {c: d.score(cols).float() for c, d in self.by_column(want).items()}

    def to_json(self, tensors: dict[str, Tensor], ref: Callable[[str], Any]) -> dict[str, Any]:
        """config.json's ``detectors`` section: one entry per detector (name, options, a reference
        ``ref(key)`` per fitted tensor; the tensors go to ``tensors`` under ``detector.<column>.<key>``)
        and the selection table if any."""
        entries = []
        for d in self.all:
            refs = {}
            for k, v in d.tensors().items():
                tensors[key := f"detector.{d.column}.{k}"] = v.contiguous()
                refs[k] = ref(key)
            candidate = {"candidate": True} if isinstance(d, StatisticsDetector) and d.candidate else {}
            entries.append({"name": d.name, **candidate, "options": d.options(), "tensors": refs})
        return {"fitted": entries, **({"selection": self.selection} if self.selection else {})}

    @classmethod
    def from_detectors(cls, detectors: list[Detector], selection: Mapping[str, dict[str, float]] | None = None,
                       ) -> FittedDetectors:
        """The detectors in their roles: the first non-candidate on NRM statistics is the main one."""
        stats = [d for d in detectors if isinstance(d, StatisticsDetector)]
        main = next((d for d in stats if not d.candidate), None)
        return cls(main, [d for d in stats if d is not main], [d for d in detectors if isinstance(d, BaselineDetector)],
                   dict(selection or {}))
