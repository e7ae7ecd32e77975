"""Detectors on the NRM's per-sample statistics: the feature sets they read, and their common base.

The latent prior eta alone is one-sided in the wrong way for half of the OOD sets: low-variance
inputs (MNIST under a Fashion-MNIST model) get a small eta, high-variance ones (textures) a large
eta, so "higher eta = in-distribution" fails on the second kind. These detectors instead model the
in-distribution *distribution* of the statistics, fitted on held-out in-distribution data, and score
how typical a sample is: too small and too large are both atypical.

Every one reads a feature vector f(x) (``FEATURE_SETS``, built by :func:`features`):

    eta           f = (eta,)                                   eta = sum_l eta_l (latent_prior)
    layers        f = (eta_1, ..., eta_L)                      per-layer b(l)^T (s(l) . h(l))
    layers_recon  f = (eta_1, ..., eta_L, log ||x - h(0)||^2)  plus the log reconstruction error
    channels      f = (eta_{l,c}) for every bias layer l and output channel c, where
                  eta_{l,c} = b_c(l) sum_p (s(l) . h(l))_{c,p} and eta_l = sum_c eta_{l,c}
                  (the score dict's ``latent_prior_channels``; sum_l C_l values)
    channels_recon  channels plus log ||x - h(0)||^2
    gates         f = (g_{l,c}): the on-rate of the ReLU latents s*(l) of channel c over positions,
                  g_{l,c} = mean_p 1[z(l)_{c,p} > 0] (NRM.unit_stats; sum_l C_l values)
    gates_recon   gates plus log ||x - h(0)||^2
    gates_acts    gates plus a_{l,c} = mean_p max(z(l)_{c,p}, 0), the channel's mean activation
    gates_channels_recon  gates, channels and log ||x - h(0)||^2

and makes column ``det_<name>`` (``det_<name>_<features>`` for a candidate kept beside the main
detector), higher = more in-distribution. docs/results-detectors.md compares them on validation OOD
data; ``DEFAULT_DETECTOR`` is the winner there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.base import Detector, DetectorError, Head, Rows
from nrm.names import DEFAULT_FEATURES, FEATURE_SETS
from nrm.names import DETECTOR_PREFIX as PREFIX

# The score-dict entry behind each part of a feature-set name; "recon" is log ||x - h(0)||^2.
# A detector with a full covariance (``dense``) over more features than this is refused before it is
# fitted: 16,384 features make a 2 GiB float64 matrix (a ResNet-50's ~45,000 gate rates would make 16 GB).
MAX_DENSE_FEATURES = 16_384

_PARTS = {"eta": "latent_prior", "layers": "latent_prior_layers", "channels": "latent_prior_channels",
          "gates": "latent_gates", "acts": "unit_acts", "recon": "recon_sq_error"}


def check_features(feature_set: str) -> None:
    if feature_set not in FEATURE_SETS:
        raise DetectorError(f"unknown detector feature set {feature_set!r}; expected one of {list(FEATURE_SETS)}")


def features(cols: Rows, feature_set: str) -> Tensor:
    """The detector input f (N, D), float64, from a score dict (see the module docstring)."""
    check_features(feature_set)
    parts = []
    for part in feature_set.split("_"):
        v = cols[_PARTS[part]].double()
        if part == "recon":
            v = v.clamp_min(1e-12).log()
        parts.append(v if v.dim() == 2 else v[:, None])  # (N, D_part)
    return torch.cat(parts, dim=1)  # (N, D)


def per_class(f: Tensor, pred: Tensor, n_classes: int, stat: Callable[[Tensor], Tensor], min_count: int = 2) -> Tensor:
    """stat over the samples predicted as each class (K, ...); a class with < min_count gets the pooled stat."""
    pooled = stat(f)
    return torch.stack([stat(f[pred == k]) if int((pred == k).sum()) >= min_count else pooled
                        for k in range(n_classes)])


@dataclass(eq=False)
class StatisticsDetector(Detector):
    """A detector on NRM statistics (the ``det_*`` columns): fitted on the feature set f of
    in-distribution rows and their predicted classes y*. A subclass implements the pure fit and
    score on f (:meth:`_fit_features`, :meth:`_score_features`); its tensors are float64."""

    features: str = DEFAULT_FEATURES  # the feature set f(x) it reads (FEATURE_SETS)
    candidate: bool = field(default=False, kw_only=True)  # kept beside the main detector, not the main one
    unsaved: ClassVar[tuple[str, ...]] = ("candidate",)  # a checkpoint records it beside the options
    pure: ClassVar[str] = ""  # for a detector that adds a non-NRM feature: the pure NRM detector it extends
    dense: ClassVar[bool] = False  # holds a D x D covariance of its features (MAX_DENSE_FEATURES)
    # (device, the fitted tensors, their float64 copies there and _derive's): see _on; not saved
    _device_copy: tuple[torch.device, dict[str, Tensor], dict[str, Tensor]] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_features(self.features)

    @property
    def column(self) -> str:
        """``det_<name>``, or ``det_<name>_<features>`` for a candidate."""
        return f"{PREFIX}{self.name}_{self.features}" if self.candidate else PREFIX + self.name

    def parts(self) -> set[str]:
        """The feature parts it reads (eta, layers, channels, gates, acts, recon)."""
        return set(self.features.split("_"))

    def inputs(self) -> set[str]:
        """pred and the columns of its feature parts."""
        return {"pred", *(_PARTS[p] for p in self.parts())}

    def _fit(self, rows: dict[str, Tensor], head: Head, **options: Any) -> dict[str, Tensor]:
        f = features(rows, self.features)
        if self.dense and f.shape[1] > MAX_DENSE_FEATURES:
            gib = f.shape[1] ** 2 * 8 / 2**30
            raise DetectorError(f"detector {self.name!r} on feature set {self.features!r}: this network gives "
                                f"{f.shape[1]:,} features, whose covariance would take {gib:.1f} GiB (limit "
                                f"{MAX_DENSE_FEATURES:,} features); choose a smaller feature set such as 'eta' or "
                                "'layers' (one value per layer), or the detector 'typicality'")
        return self._fit_features(f, rows["pred"].long(), head.n_classes, **options)

    def score(self, cols: Rows) -> Tensor:
        """s (N,), float32, higher = more in-distribution."""
        fitted = self.tensors()
        try:
            f = features(cols, self.features)
            s = self._score_features(f, cols["pred"].long(), self._on(f.device, fitted))
        except (KeyError, IndexError, RuntimeError) as e:
            raise DetectorError(f"detector {self.name!r}: fitted state does not match the score columns ({e})") from None
        return s.float()

    def _on(self, device: torch.device, fitted: dict[str, Tensor]) -> dict[str, Tensor]:
        """``fitted`` (this detector's tensors()) in float64 on ``device``, with what :meth:`_derive`
        adds, made once per fit and device: a GPU would otherwise be sent a ResNet-56's 4,064 x 4,064
        precision at every batch."""
        cached = self._device_copy
        if cached is None or cached[0] != device or any(cached[1][k] is not v for k, v in fitted.items()):
            on = {k: v.to(device, torch.float64) for k, v in fitted.items()}
            cached = self._device_copy = (device, fitted, {**on, **self._derive(on)})
        return cached[2]

    def _derive(self, fitted: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tensors ``_score_features`` reads that follow from the fitted ones (made once per fit and device)."""
        return {}

    def _fit_features(self, f: Tensor, pred: Tensor, n_classes: int, **options: Any) -> dict[str, Tensor]:
        raise NotImplementedError

    def _score_features(self, f: Tensor, pred: Tensor, fitted: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError
