"""Typed configuration of an NRM: the graph, the input spec and the fitted state.

The checkpoint's ``config.json`` is the serialisation of :class:`ModelConfig` and nothing more; its
tensors (weights and the fitted detector's arrays) live in weights.safetensors. Format version 2
holds a graph (``nodes``, nrm.graph); version 1 held a plain layer list and still loads: each layer
becomes one node reading the previous one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nrm.detectors import Detector, DetectorError, FittedDetectors, lookup
from nrm.graph import GraphError, Node, chain, infer_shapes
from nrm.ops import OpError, op_from_dict
from nrm.posthoc import REGISTRY, PosthocError
from nrm.reference import Reference

FORMAT = "nrm-checkpoint"
VERSION = 2
READS = (1, 2)
TENSOR_REF = "$tensor"  # {"$tensor": key}: a detector array stored in weights.safetensors under key
FITTED_PREFIXES = ("detector.", "posthoc.")  # weights.safetensors keys of fitted arrays, not of the network


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
    """State fitted on in-distribution data after training; see nrm.fit."""

    sigma2: float = 1.0  # ML noise variance of x | z,y (mean squared residual per input value)
    log_partition: list[float] = field(default_factory=list)  # log Z(y), one per class; zeros = "none"
    normaliser: str = "none"  # which estimator produced log_partition (nrm.fit.NORMALISERS)
    threshold: Threshold | None = None
    detector: FittedDetectors | None = None  # fitted OOD detectors on the NRM statistics (nrm.detectors)
    posthoc: dict[str, Any] = field(default_factory=dict)  # name -> fitted post-hoc baseline (nrm.posthoc)


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
            out["detector"] = _detectors_json(self.fitted.detector, tensors)
        if self.fitted.posthoc:
            out["posthoc"] = {}
            for name, det in self.fitted.posthoc.items():
                keys = {k: f"posthoc.{name}.{k}" for k in det.tensors()}
                tensors.update({keys[k]: v.contiguous() for k, v in det.tensors().items()})
                out["posthoc"][name] = {"options": det.options(), "tensors": {k: {TENSOR_REF: v} for k, v in keys.items()}}
        return out, tensors

    @classmethod
    def from_json(cls, d: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> ModelConfig:
        """Parse config.json (version 1 or 2); ``tensors`` resolves the detector's array references."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ConfigError(f"config.json: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        version = d.get("version")
        if version not in READS:
            raise ConfigError(f"config.json: 'version' is {version!r}, this nrm reads {list(READS)}")
        graph_key = "nodes" if version == 2 else "layers"
        known = {"format", "version", "input", "classes", graph_key, "sigma2", "log_partition", "normaliser",
                 "threshold", "detector", "posthoc"}
        if unknown := sorted(set(d) - known):
            raise ConfigError(f"config.json: unknown key(s) {unknown}; expected {sorted(known)}")
        for key in ("input", "classes", graph_key):
            if key not in d:
                raise ConfigError(f"config.json: missing key {key!r}")
        if not isinstance(d["classes"], list) or not isinstance(d[graph_key], list):
            raise ConfigError(f"config.json: 'classes' and {graph_key!r} must be lists")
        classes = [str(c) for c in d["classes"]]
        nodes = _nodes_v2(d["nodes"]) if version == 2 else _nodes_v1(d["layers"])
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
        detector=_detectors(dict(d.get("detector") or {}), tensors),
        posthoc=_posthoc(d.get("posthoc") or {}, tensors),
    )


def _posthoc(raw: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Rebuild the fitted post-hoc baselines from their options and referenced arrays."""
    out = {}
    for name, entry in raw.items():
        cls = REGISTRY.get(name)
        if cls is None:
            raise ConfigError(f"config.json: unknown post-hoc detector {name!r}; expected one of {sorted(REGISTRY)}")
        refs = {k: v[TENSOR_REF] for k, v in entry.get("tensors", {}).items()}
        if missing := sorted(v for v in refs.values() if v not in tensors):
            raise ConfigError(f"config.json: post-hoc {name!r} arrays {missing} are not in weights.safetensors")
        try:
            out[name] = cls.from_tensors({k: tensors[v] for k, v in refs.items()}, **entry.get("options", {}))
        except PosthocError as e:
            raise ConfigError(f"config.json: post-hoc {name!r}: {e}") from None
    return out


def _detector_refs(det: Detector, prefix: str, out: dict[str, Tensor]) -> dict[str, Any]:
    """One detector as config.json holds it: its name, options and a reference per fitted array (the
    arrays go to ``out`` under ``<prefix>.<key>``)."""
    params = {}
    for k, v in det.tensors().items():
        out[f"{prefix}.{k}"] = torch.as_tensor(v, dtype=torch.float64).contiguous()
        params[k] = {TENSOR_REF: f"{prefix}.{k}"}
    return {"name": det.name, **det.options(), "params": params}


def _detectors_json(fitted: FittedDetectors, out: dict[str, Tensor]) -> dict[str, Any]:
    """config.json's ``detector``: the main detector, then its ``selection`` and ``candidates`` if any."""
    res = _detector_refs(fitted.main, "detector", out)
    if fitted.selection:
        res["selection"] = fitted.selection
    if fitted.candidates:
        res["candidates"] = [_detector_refs(c, f"detector.candidates.{i}", out) for i, c in enumerate(fitted.candidates)]
    return res


def _detectors(raw: dict[str, Any], tensors: dict[str, Tensor]) -> FittedDetectors | None:
    """Inverse of _detectors_json; None when config.json has no detector."""
    if not raw:
        return None
    try:
        return FittedDetectors(_detector(raw, tensors, candidate=False),
                               [_detector(c, tensors, candidate=True) for c in raw.get("candidates", [])],
                               dict(raw.get("selection") or {}))
    except DetectorError as e:
        raise ConfigError(f"config.json: {e}") from None


def _detector(raw: dict[str, Any], tensors: dict[str, Tensor], candidate: bool) -> Detector:
    """Inverse of _detector_refs; version-1 float lists become tensors too."""
    cls = lookup(str(raw.get("name")))
    if "features" not in raw:
        raise ConfigError(f"config.json: detector {cls.name!r} has no 'features'")
    params = {}
    for k, v in raw.get("params", {}).items():
        if isinstance(v, dict) and TENSOR_REF in v:
            if v[TENSOR_REF] not in tensors:
                raise ConfigError(f"config.json: detector array {v[TENSOR_REF]!r} is not in weights.safetensors")
            params[k] = tensors[v[TENSOR_REF]].double()
        else:
            params[k] = torch.tensor(v, dtype=torch.float64)
    return cls.from_tensors(params, candidate=candidate, features=str(raw["features"]))


def validate(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Check the graph against the input and the classes; returns every node's per-sample shape."""
    if min(cfg.input.shape) < 1:
        raise ConfigError(f"input: channels, height and width must be >= 1, got {cfg.input.shape}")
    try:
        return infer_shapes(cfg.nodes, cfg.input.shape, len(cfg.classes))
    except GraphError as e:
        raise ConfigError(str(e)) from None
