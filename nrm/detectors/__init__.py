"""Fitted OOD detectors: one protocol (nrm.detectors.base.Detector), one registry, one error type.

Two families share the protocol:

- on the NRM's statistics (:class:`StatisticsDetector`; nrm.names.DETECTORS), column ``det_<name>``:
  typicality, mahalanobis, gmm, mahalanobis_energy, mahalanobis_energy_robust, each on a feature set
  (nrm.detectors.statistics); nrm.detectors.default picks one for users without validation OOD data;
- the field's post-hoc baselines on the penultimate features (:class:`BaselineDetector`;
  nrm.names.POSTHOC), a column of their own name: mahalanobis_feat, knn, vim (nrm.detectors.baseline).

Each method is one file here, named after it: the score a pure tensor function with its formula in
the docstring, a thin dataclass holding the fitted state. ``ModelConfig.fitted.detector`` holds a
model's as one :class:`FittedDetectors`, stored in config.json's ``detectors`` section with its
tensors in weights.safetensors.

To add a detector: write ``nrm/detectors/<method>.py`` with a subclass of StatisticsDetector or
BaselineDetector that sets ``name`` (it registers itself; this package imports every module in it),
and add the name to nrm.names (the torch-free list the command line offers; a test holds the two equal).
"""

from __future__ import annotations

import importlib
import pkgutil

from nrm.detectors.base import Detector, DetectorError, Head, Rows, gather, lookup, registry
from nrm.detectors.baseline import BaselineDetector
from nrm.detectors.choose import CANDIDATES, SEARCH, choose, split_halves, statistics_detector
from nrm.detectors.fitted import FittedDetectors
from nrm.detectors.statistics import StatisticsDetector, features
from nrm.names import DEFAULT_FEATURES, DETECTORS, FEATURE_SETS, POSTHOC
from nrm.names import DETECTOR_PREFIX as PREFIX

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from nrm.detectors.gmm import GMM, fit_gmm, gmm_loglik  # noqa: E402
from nrm.detectors.knn import KNN, knn_distance  # noqa: E402
from nrm.detectors.mahalanobis import (  # noqa: E402
    FAST_DIMS,
    Mahalanobis,
    fit_mahalanobis,
    mahalanobis,
    quadratic_form,
    symmetric_slabs,
)
from nrm.detectors.mahalanobis_energy import MahalanobisEnergy  # noqa: E402
from nrm.detectors.mahalanobis_energy_robust import MahalanobisEnergyRobust  # noqa: E402
from nrm.detectors.mahalanobis_feat import MahalanobisFeat, mahalanobis_penultimate  # noqa: E402
from nrm.detectors.typicality import Typicality, fit_typicality, typicality  # noqa: E402
from nrm.detectors.vim import ViM, vim, vim_default_dim, vim_residual  # noqa: E402

REGISTRY = registry()  # name -> detector class

__all__ = [
    "CANDIDATES", "DEFAULT_FEATURES", "DETECTORS", "FAST_DIMS", "FEATURE_SETS", "GMM", "KNN", "POSTHOC", "PREFIX",
    "REGISTRY", "SEARCH", "BaselineDetector", "Detector", "DetectorError", "FittedDetectors", "Head", "Mahalanobis",
    "MahalanobisEnergy", "MahalanobisEnergyRobust", "MahalanobisFeat", "Rows", "StatisticsDetector", "Typicality", "ViM", "choose", "features",
    "fit_gmm", "fit_mahalanobis", "fit_typicality", "gather", "gmm_loglik", "knn_distance", "lookup", "mahalanobis",
    "mahalanobis_penultimate", "quadratic_form", "registry", "split_halves", "statistics_detector",
    "symmetric_slabs", "typicality", "vim", "vim_default_dim", "vim_residual",
]
