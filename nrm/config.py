"""Typed configuration of an NRM: the graph, the input spec and the fitted state.

The checkpoint's ``config.json`` is the serialisation of :class:`ModelConfig` and nothing more; its
tensors (weights and the fitted detectors' arrays) live in weights.safetensors. Format version 3
holds a graph (``nodes``, nrm.graph) and every fitted detector in one ``detectors`` section. Older
versions still load: version 2 kept the detectors on NRM statistics (``detector``) apart from the
post-hoc baselines (``posthoc``); version 1 also held a plain layer list (each layer becomes one node
reading the previous one) and its detector's arrays as float lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from nrm.detectors import Detector, DetectorError, FittedDetectors, StatisticsDetector, lookup
from nrm.graph import GraphError, Node, chain, infer_shapes
from nrm.ops import OpError, op_from_dict
from nrm.reference import Reference

FORMAT = "nrm-checkpoint"
VERSION = 3
READS = (1, 2, 3)
TENSOR_REF = "$tensor"  # {"$tensor": key}: a detector array stored in weights.safetensors under key
# weights.safetensors keys of fitted arrays, not of the network ("posthoc." in version 2 only)
FITTED_PREFIXES = ("detector.", "posthoc.")


class ConfigError(ValueError):
    """A config or checkpoint that does not describe a valid NRM; the message says what and where."""


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: channels x height x width, normalised with per-channel mean/std of [0, 1] pixels."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"input: mean {list(self.mean)} and std {list(self.std)} must have one value per channel "
                f"({self.channels})"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"input: std must be positive, got {list(self.std)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class Threshold:
    """A sample is flagged OOD when ``score`` (a column where higher = more in-distribution) < ``value``."""

    score: str
    value: float
    tpr: float = 0.95
    reference: Reference | None = None  # the score on the held-out rows that set the value (nrm.reference)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"score": self.score, "value": self.value, "tpr": self.tpr}
        if self.reference is not None:
            out["reference"] = self.reference.to_json()
        return out

    @classmethod
    def from_json(cls, th: dict[str, Any]) -> Threshold:
        try:
            ref = Reference.from_json(th["reference"]) if th.get("reference") else None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"config.json: 'threshold.reference' needs rows, expected_rate and non-decreasing "
                              f"quantiles ({e})") from None
        return cls(str(th["score"]), float(th["value"]), float(th.get("tpr", 0.95)), ref)


@dataclass
class Fitted:
    """State fitted on in-distribution data after training; see nrm.fit. A new fitted quantity is a
    field here, written by :meth:`ModelConfig.to_json` and read by ``_fitted`` (its tensors, if any,
    under a ``detector.``-prefixed key, which model_id leaves out)."""

    sigma2: float = 1.0  # ML noise variance of x | z,y (mean squared residual per input value)
    log_partition: list[float] = field(default_factory=list)  # log Z(y), one per class; zeros = "none"
    normaliser: str = "none"  # which estimator produced log_partition (nrm.fit.NORMALISERS)
    threshold: Threshold | None = None
    detector: FittedDetectors | None = None  # the fitted OOD detectors (nrm.detectors); None: none fitted


@dataclass
class ModelConfig:
    input: InputSpec
    classes: list[str]
    nodes: list[Node]
    fitted: Fitted = field(default_factory=Fitted)

    def to_json(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """(config.json contents, the detector tensors it references by key)."""
        tensors: dict[str, Tensor] = {}
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "input": {"channels": self.input.channels, "height": self.input.height, "width": self.input.width,
                      "mean": list(self.input.mean), "std": list(self.input.std)},
            "classes": list(self.classes),
            "nodes": [n.to_dict() for n in self.nodes],
            "sigma2": self.fitted.sigma2,
            "log_partition": list(self.fitted.log_partition),
            "normaliser": self.fitted.normaliser,
            "threshold": self.fitted.threshold.to_json() if self.fitted.threshold else None,
        }
        if self.fitted.detector:
            out["detectors"] = self.fitted.detector.to_json(tensors, lambda key: {TENSOR_REF: key})
        return out, tensors

    @classmethod
    def from_json(cls, d: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> ModelConfig:
        """Parse config.json (versions READS); ``tensors`` resolves the detectors' array references."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ConfigError(f"config.json: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        version = d.get("version")
        if version not in READS:
            raise ConfigError(f"config.json: 'version' is {version!r}, this nrm reads {list(READS)}")
        graph_key = "layers" if version == 1 else "nodes"
        known = {"format", "version", "input", "classes", graph_key, "sigma2", "log_partition", "normaliser",
                 "threshold", *(["detectors"] if version == 3 else ["detector", "posthoc"])}
        if unknown := sorted(set(d) - known):
            raise ConfigError(f"config.json: unknown key(s) {unknown}; expected {sorted(known)}")
        for key in ("input", "classes", graph_key):
            if key not in d:
                raise ConfigError(f"config.json: missing key {key!r}")
        if not isinstance(d["classes"], list) or not isinstance(d[graph_key], list):
            raise ConfigError(f"config.json: 'classes' and {graph_key!r} must be lists")
        classes = [str(c) for c in d["classes"]]
        nodes = _nodes_v1(d["layers"]) if version == 1 else _nodes_v2(d["nodes"])
        cfg = cls(_input_spec(d["input"]), classes, nodes, _fitted(d, len(classes), tensors or {}))
        validate(cfg)
        return cfg


def _input_spec(i: Any) -> InputSpec:
    try:
        return InputSpec(int(i["channels"]), int(i["height"]), int(i["width"]), tuple(i["mean"]), tuple(i["std"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config.json: 'input' needs integer channels, height, width and lists mean, std ({e})"
                          ) from None


def _nodes_v2(raw: list[Any]) -> list[Node]:
    try:
        return [Node.from_dict(x, k) for k, x in enumerate(raw)]
    except GraphError as e:
        raise ConfigError(f"config.json: {e}") from None


def _nodes_v1(raw: list[Any]) -> list[Node]:
    """Version 1: a layer list; conv and linear layers carried their names."""
    items: list[Any] = []
    for k, layer in enumerate(raw):
        if not isinstance(layer, dict) or "type" not in layer:
            raise ConfigError(f"config.json: layers[{k}]: expected an object with a 'type', got {layer!r}")
        attrs = {a: v for a, v in layer.items() if a not in ("type", "name")}
        try:
            op = op_from_dict(str(layer["type"]), attrs)
        except OpError as e:
            raise ConfigError(f"config.json: layers[{k}]: {e}") from None
        items.append((layer["name"], op) if "name" in layer else op)
    return chain(*items)


def _fitted(d: dict[str, Any], n_classes: int, tensors: dict[str, Tensor]) -> Fitted:
    log_z = [float(v) for v in d.get("log_partition") or [0.0] * n_classes]
    if len(log_z) != n_classes:
        raise ConfigError(f"config.json: 'log_partition' has {len(log_z)} values, expected one per class ({n_classes})")
    sigma2 = float(d.get("sigma2", 1.0))
    if not (math.isfinite(sigma2) and sigma2 > 0):
        raise ConfigError(f"config.json: 'sigma2' must be a positive finite number, got {sigma2!r}")
    th = d.get("threshold")
    return Fitted(
        sigma2=sigma2,
        log_partition=log_z,
        normaliser=str(d.get("normaliser", "none")),
        threshold=Threshold.from_json(th) if th else None,
        detector=_detectors(d, tensors),
    )


def _detectors(d: dict[str, Any], tensors: dict[str, Tensor]) -> FittedDetectors | None:
    """The fitted detectors of config.json: its ``detectors`` section (version 3), or the ``detector``
    and ``posthoc`` sections of version 2 (and 1); None when it has none."""
    try:
        if "detectors" in d:
            raw = dict(d["detectors"] or {})
            found = [_detector(e, tensors) for e in raw.get("fitted", [])]
            selection = raw.get("selection")
        else:
            old = dict(d.get("detector") or {})
            found = [_detector_v2(old, tensors, False)] if old else []
            found += [_detector_v2(c, tensors, True) for c in old.get("candidates", [])]
            found += [_posthoc_v2(name, e, tensors) for name, e in (d.get("posthoc") or {}).items()]
            selection = old.get("selection")
    except DetectorError as e:
        raise ConfigError(f"config.json: {e}") from None
    return FittedDetectors.from_detectors(found, selection) if found else None


def _arrays(refs: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """A detector's tensors from their references into weights.safetensors (float lists as they are)."""
    out = {}
    for k, v in refs.items():
        if isinstance(v, dict) and TENSOR_REF in v:
            if v[TENSOR_REF] not in tensors:
                raise ConfigError(f"config.json: detector array {v[TENSOR_REF]!r} is not in weights.safetensors")
            out[k] = tensors[v[TENSOR_REF]]
        else:
            out[k] = v
    return out


def _detector(entry: dict[str, Any], tensors: dict[str, Tensor]) -> Detector:
    """One entry of version 3's ``detectors.fitted``: name, options, tensors, candidate."""
    cls = lookup(str(entry.get("name")))
    candidate = {"candidate": True} if entry.get("candidate") else {}
    return cls.from_tensors(_arrays(entry.get("tensors", {}), tensors), **entry.get("options", {}), **candidate)


def _detector_v2(raw: dict[str, Any], tensors: dict[str, Tensor], candidate: bool) -> Detector:
    """Version 2's ``detector`` (or one of its candidates): name, features and params."""
    cls = lookup(str(raw.get("name")), StatisticsDetector)
    if "features" not in raw:
        raise ConfigError(f"config.json: detector {cls.name!r} has no 'features'")
    return cls.from_tensors(_arrays(raw.get("params", {}), tensors), features=str(raw["features"]), candidate=candidate)


V2_POSTHOC = {"mahalanobis_penultimate": "mahalanobis_feat", "knn": "knn", "vim": "vim"}  # version 2's names


def _posthoc_v2(name: str, entry: dict[str, Any], tensors: dict[str, Tensor]) -> Detector:
    """One entry of version 2's ``posthoc``: a baseline's options and tensors, under its version-2 name."""
    if name not in V2_POSTHOC:
        raise ConfigError(f"config.json: unknown post-hoc detector {name!r}; expected one of {sorted(V2_POSTHOC)}")
    return lookup(V2_POSTHOC[name]).from_tensors(_arrays(entry.get("tensors", {}), tensors), **entry.get("options", {}))


def validate(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Check the graph against the input and the classes; returns every node's per-sample shape."""
    if min(cfg.input.shape) < 1:
        raise ConfigError(f"input: channels, height and width must be >= 1, got {cfg.input.shape}")
    try:
        return infer_shapes(cfg.nodes, cfg.input.shape, len(cfg.classes))
    except GraphError as e:
        raise ConfigError(str(e)) from None
