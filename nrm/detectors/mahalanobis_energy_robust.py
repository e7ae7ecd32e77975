"""Mahalanobis on NRM statistics fused with energy, each part standardised by its median and MAD
(column ``det_mahalanobis_energy_robust``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from nrm.detectors.mahalanobis_energy import MahalanobisEnergy

MAD_TO_STD = 1.4826  # the standard deviation of a normal distribution is 1.4826 x its median absolute deviation


@dataclass(eq=False)
class MahalanobisEnergyRobust(MahalanobisEnergy):
    """:class:`MahalanobisEnergy` with each part centred on its median and scaled by 1.4826 x its
    median absolute deviation (MAD) on the rows the Gaussian was not fitted on:

        s = (s_maha - med_1) / (1.4826 MAD_1) + (-E - med_2) / (1.4826 MAD_2)

    The Gaussian part has a heavy tail on in-distribution rows: on the pretrained ResNet-56 one
    training row lies at Mahalanobis distance 1.15 million where the median is 2,000, which
    multiplies a standard deviation by 19 and leaves the fused score the energy alone. The median
    and the MAD do not move with a few such rows (docs/study-default-detector.md section 3).
    NOT a pure NRM score (energy is a baseline); its pure detector is :class:`Mahalanobis`."""

    name: ClassVar[str] = "mahalanobis_energy_robust"

    @staticmethod
    def standardiser(parts: Tensor) -> tuple[Tensor, Tensor]:
        """(median, 1.4826 x MAD) of each part (N, 2) -> (2,), (2,)."""
        centre = parts.median(0).values
        return centre, MAD_TO_STD * (parts - centre).abs().median(0).values
