"""The detector protocol: every OOD detector of nrm.detectors is a :class:`Detector`.

    det = lookup("mahalanobis")("gates_acts").fit(batches, head)   # in-distribution score dicts
    s = det.score(cols)                                            # (N,), higher = in-distribution
    again = type(det).from_tensors(det.tensors(), **det.options()) # what a checkpoint stores

A detector reads score dicts (what ``NRM.score`` / ``Runner.score`` return: columns and the detector
inputs of nrm.plan.INPUTS, plus ``label`` when fitting on labelled rows) and declares which entries
it reads (:meth:`Detector.inputs`, :meth:`Detector.fit_inputs`), so that a plan runs the passes that
make them. ``fit`` takes one score dict or a stream of them and the classifier it serves
(:class:`Head`); its fitted state is a flat dict of tensors (``keys``, one dataclass field each) plus
JSON options (its other init fields), and ``from_tensors`` rebuilds it. Used unfitted, or given
tensors or options that do not fit, it raises a DetectorError that names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from nrm import names

Rows = Mapping[str, Tensor]  # a score dict: entry -> (N, ...) tensor
_D = TypeVar("_D", bound="Detector")
_FOUND: dict[str, type[Detector]] = {}  # every class with a name, as defined (nrm.detectors orders them)


class DetectorError(ValueError):
    """A detector name, option, input or fitted state that cannot be used; the message says which."""


def registry() -> dict[str, type[Detector]]:
    """Every detector class by name: those nrm.names lists, in its order, then any other defined."""
    listed = [n for n in (*names.DETECTORS, *names.POSTHOC) if n in _FOUND]
    return {n: _FOUND[n] for n in [*listed, *sorted(set(_FOUND) - set(listed))]}


def lookup(name: str, kind: type[Detector] | None = None) -> type[Detector]:
    """The detector class registered as ``name`` (a subclass of ``kind``, if given); a DetectorError
    listing the valid names otherwise."""
    valid = {n: c for n, c in registry().items() if kind is None or issubclass(c, kind)}
    if name not in valid:
        raise DetectorError(f"unknown detector {name!r}; expected one of {list(valid)}")
    return valid[name]


@dataclass(frozen=True)
class Head:
    """The classifier a detector is fitted for: its class count and final linear layer
    (logits = f W^T + b); ``NRM.head()`` gives a model's."""

    n_classes: int
    weight: Tensor | None = None  # (K, F)
    bias: Tensor | None = None  # (K,)


def gather(data: Rows | Iterable[Rows], keys: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The entries ``keys`` (default: every entry) of one score dict or of a stream of them,
    concatenated on the CPU: (N, ...) each; {} for an empty stream."""
    parts: dict[str, list[Tensor]] = {}
    for batch in [data] if isinstance(data, Mapping) else data:
        for k in batch if keys is None else keys:
            if k not in batch:
                raise DetectorError(f"score dict has no {k!r} (it has {sorted(batch)}); score with a plan that "
                                    "makes it (nrm.plan)")
            parts.setdefault(k, []).append(batch[k].detach().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@dataclass(eq=False)
class Detector:
    """The base of every detector (see the module docstring). A subclass sets ``name`` (its registry
    name), ``keys`` (its fitted tensors, one field each), ``fit_options`` (keyword options of ``fit``
    that are not saved), and implements :meth:`inputs`, :meth:`_fit` and :meth:`score`."""

    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()
    fit_options: ClassVar[tuple[str, ...]] = ()
    unsaved: ClassVar[tuple[str, ...]] = ()  # init fields that are neither fitted tensors nor options()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            _FOUND[cls.name] = cls

    @property
    def column(self) -> str:
        """The score column it makes in NRM.score."""
        raise NotImplementedError

    def inputs(self) -> set[str]:
        """The score-dict entries :meth:`score` reads."""
        raise NotImplementedError

    def fit_inputs(self) -> set[str]:
        """The score-dict entries :meth:`fit` reads (by default what it scores on)."""
        return self.inputs()

    def fit(self: _D, data: Rows | Iterable[Rows], head: Head | int, **options: Any) -> _D:
        """Fit on in-distribution score dicts (one, or a stream of batches) for the classifier ``head``
        (or its class count); returns self."""
        if unknown := sorted(set(options) - set(self.fit_options)):
            raise DetectorError(f"detector {self.name!r}: unknown fit options {unknown}; "
                                f"expected a subset of {list(self.fit_options)}")
        rows = gather(data, sorted(self.fit_inputs()))
        if not rows or len(next(iter(rows.values()))) == 0:
            raise DetectorError(f"detector {self.name!r}: no in-distribution samples to fit on")
        for key, value in self._fit(rows, head if isinstance(head, Head) else Head(head), **options).items():
            setattr(self, key, value.contiguous())  # safetensors stores only contiguous tensors
        return self

    def _fit(self, rows: dict[str, Tensor], head: Head, **options: Any) -> dict[str, Tensor]:
        """The fitted tensors by key, from the gathered rows."""
        raise NotImplementedError

    def score(self, cols: Rows) -> Tensor:
        """s (N,), higher = more in-distribution, from a score dict holding :meth:`inputs`."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """The fitted tensors by key (``keys``); a DetectorError if unfitted."""
        fitted = {k: getattr(self, k) for k in self.keys}
        if any(v is None for v in fitted.values()):
            cls = type(self).__name__
            raise DetectorError(f"detector {self.name!r} is not fitted; call {cls}.fit(...) on in-distribution "
                                f"data first, or rebuild it with {cls}.from_tensors(saved_tensors, **saved_options)")
        return fitted

    def options(self) -> dict[str, Any]:
        """Its JSON options: the init fields that are not fitted tensors."""
        return {f.name: getattr(self, f.name) for f in self._option_fields() if f.name not in self.unsaved}

    @classmethod
    def _option_fields(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if f.init and f.name not in cls.keys]

    @classmethod
    def from_tensors(cls: type[_D], tensors: Mapping[str, Any], **options: Any) -> _D:
        """Rebuild a fitted detector from ``tensors()`` and ``options()`` (float lists are accepted too)."""
        allowed = [f.name for f in cls._option_fields()]
        if unknown := sorted(set(options) - set(allowed)):
            raise DetectorError(f"detector {cls.name!r}: unknown options {unknown}; expected a subset of {allowed}")
        if missing := [k for k in cls.keys if k not in tensors]:
            raise DetectorError(f"detector {cls.name!r}: missing fitted tensors {missing}; expected {list(cls.keys)}, "
                                f"got {sorted(tensors)}")
        return cls(**options, **{k: cls._load(tensors[k]) for k in cls.keys})

    @staticmethod
    def _load(t: Any) -> Tensor:
        """A saved tensor as the detector holds it: float64 by default."""
        return torch.as_tensor(t, dtype=torch.float64).contiguous()
