"""Mahalanobis on NRM statistics fused with the classifier's energy (column ``det_mahalanobis_energy``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.base import DetectorError, Head, Rows, gather
from nrm.detectors.mahalanobis import Mahalanobis


def standardised_sum(parts: Tensor, centre: Tensor, scale: Tensor) -> Tensor:
    """Equal-weight fusion of J scores, each standardised: s = sum_j (p_j - c_j) / d_j.
    parts (N, J), centre and scale (J,)."""
    return ((parts - centre) / scale).sum(dim=1)


@dataclass(eq=False)
class MahalanobisEnergy(Mahalanobis):
    """:class:`Mahalanobis` on NRM statistics plus the classifier's energy (Liu et al. 2020,
    "Energy-based Out-of-distribution Detection"), with equal weights once each is standardised:

        s = (s_maha - c_1) / d_1 + (-E - c_2) / d_2,       -E = log sum_k exp(logit_k)

    (E is the score dict's ``energy`` column, higher = more OOD, so -E counts for in-distribution.)

    (c, d) are the mean and standard deviation of the two on in-distribution rows the Gaussian was
    not fitted on (a seeded fifth of the fitting rows; the Gaussian is then refitted on all of them).
    NOT a pure NRM score: energy is one of the field's baselines. The gate statistics see how the
    network computed (which units fired), energy how confident its answer is; near-OOD images that
    fire typical units can still get low-confidence answers, and the reverse (docs/results.md §6).
    ``nrm.detectors.choose`` keeps the pure :class:`Mahalanobis` on the same features beside it."""

    centre: Tensor | None = None  # (2,)  c_1, c_2
    scale: Tensor | None = None  # (2,)  d_1, d_2
    name: ClassVar[str] = "mahalanobis_energy"
    keys: ClassVar[tuple[str, ...]] = ("means", "precision", "centre", "scale")
    pure: ClassVar[str] = "mahalanobis"

    def inputs(self) -> set[str]:
        return {*super().inputs(), "energy"}

    def fit(self, data: Rows | Iterable[Rows], head: Head | int, **options: Any) -> MahalanobisEnergy:
        cols = gather(data, sorted(self.fit_inputs()))
        n = len(cols["pred"])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        cut = n * 4 // 5 if n >= 10 else n
        held = perm[cut:] if cut < n else perm
        self.centre, self.scale = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        super().fit(_rows(cols, perm[:cut]), head, **options)
        parts = self._parts(_rows(cols, held))  # (n_held, 2)
        centre, scale = self.standardiser(parts) if len(parts) > 1 else (parts.mean(0), torch.ones(2, dtype=torch.float64))
        self.centre, self.scale = centre.contiguous(), scale.clamp_min(1e-12).contiguous()
        return super().fit(cols, head, **options)

    @staticmethod
    def standardiser(parts: Tensor) -> tuple[Tensor, Tensor]:
        """(c, d) of each part (N, 2) -> (2,), (2,): the mean and standard deviation."""
        return parts.mean(0), parts.std(0)

    def _parts(self, cols: Rows) -> Tensor:
        """(s_maha, -E) per row: (N, 2), float64, both higher = more in-distribution."""
        if "energy" not in cols:
            raise DetectorError(f"detector {self.name!r}: needs the 'energy' column of NRM.score")
        maha = Mahalanobis.score(self, cols).double()
        return torch.stack([maha, -cols["energy"].double().to(maha.device)], dim=1)

    def score(self, cols: Rows) -> Tensor:
        fitted = self.tensors()
        parts = self._parts(cols)
        return standardised_sum(parts, fitted["centre"].to(parts.device), fitted["scale"].to(parts.device)).float()


def _rows(cols: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in cols.items()}
