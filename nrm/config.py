"""Typed configuration of an NRM: the layer vocabulary, the input spec and the fitted state.

The checkpoint's ``config.json`` is the serialisation of :class:`ModelConfig` and nothing more.
Every layer is one small frozen dataclass; ``layer_from_dict`` is the only place that turns JSON
back into them, so an unknown type or a missing parameter fails here with a message that names it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

FORMAT = "nrm-checkpoint"
VERSION = 1


class ConfigError(ValueError):
    """A config or checkpoint that does not describe a valid NRM; the message says what and where."""


@dataclass(frozen=True)
class Conv:
    name: str
    in_: int
    out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    bias: bool = True
    type: ClassVar[str] = "conv"


@dataclass(frozen=True)
class ReLU:
    type: ClassVar[str] = "relu"


@dataclass(frozen=True)
class LeakyReLU:
    slope: float = 0.01
    type: ClassVar[str] = "leaky_relu"


@dataclass(frozen=True)
class MaxPool:
    kernel: int
    stride: int
    type: ClassVar[str] = "maxpool"


@dataclass(frozen=True)
class GlobalAvgPool:
    type: ClassVar[str] = "global_avgpool"


@dataclass(frozen=True)
class Flatten:
    type: ClassVar[str] = "flatten"


@dataclass(frozen=True)
class Linear:
    name: str
    in_: int
    out: int
    type: ClassVar[str] = "linear"


Layer = Conv | ReLU | LeakyReLU | MaxPool | GlobalAvgPool | Flatten | Linear
LAYER_TYPES: dict[str, type] = {
    cls.type: cls for cls in (Conv, ReLU, LeakyReLU, MaxPool, GlobalAvgPool, Flatten, Linear)
}


def layer_to_dict(layer: Layer) -> dict[str, Any]:
    # "in" is a Python keyword, so the dataclass field is in_ and the JSON key is "in".
    return {"type": layer.type, **{k.rstrip("_"): v for k, v in asdict(layer).items()}}


def layer_from_dict(d: dict[str, Any], index: int) -> Layer:
    where = f"layers[{index}]"
    if not isinstance(d, dict) or "type" not in d:
        raise ConfigError(f"{where}: expected an object with a 'type', got {d!r}")
    kind = d["type"]
    cls = LAYER_TYPES.get(kind)
    if cls is None:
        raise ConfigError(f"{where}: unknown layer type {kind!r}; expected one of {sorted(LAYER_TYPES)}")
    names = {f.name.rstrip("_"): f.name for f in fields(cls)}
    unknown = set(d) - set(names) - {"type"}
    if unknown:
        raise ConfigError(f"{where} ({kind}): unknown parameter(s) {sorted(unknown)}; expected {sorted(names)}")
    try:
        return cls(**{names[k]: v for k, v in d.items() if k != "type"})
    except TypeError as e:
        raise ConfigError(f"{where} ({kind}): {e}") from None


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


@dataclass
class Fitted:
    """State fitted on in-distribution data after training; see nrm.fit."""

    sigma2: float = 1.0  # ML noise variance of x | z,y (mean squared residual per input value)
    log_partition: list[float] = field(default_factory=list)  # log Z(y), one per class; zeros = "none"
    normaliser: str = "none"  # which estimator produced log_partition (nrm.fit.NORMALISERS)
    threshold: Threshold | None = None
    detector: dict[str, Any] = field(default_factory=dict)  # extra fitted OOD detectors (nrm.detectors)


@dataclass
class ModelConfig:
    input: InputSpec
    classes: list[str]
    layers: list[Layer]
    fitted: Fitted = field(default_factory=Fitted)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "input": {
                "channels": self.input.channels,
                "height": self.input.height,
                "width": self.input.width,
                "mean": list(self.input.mean),
                "std": list(self.input.std),
            },
            "classes": list(self.classes),
            "layers": [layer_to_dict(layer) for layer in self.layers],
            "sigma2": self.fitted.sigma2,
            "log_partition": list(self.fitted.log_partition),
            "normaliser": self.fitted.normaliser,
            "threshold": asdict(self.fitted.threshold) if self.fitted.threshold else None,
        }
        if self.fitted.detector:
            out["detector"] = self.fitted.detector
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ConfigError(f"config.json: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") != VERSION:
            raise ConfigError(f"config.json: 'version' is {d.get('version')!r}, this nrm reads {VERSION}")
        known = {"format", "version", "input", "classes", "layers", "sigma2", "log_partition", "normaliser",
                 "threshold", "detector"}
        if unknown := sorted(set(d) - known):
            raise ConfigError(f"config.json: unknown key(s) {unknown}; expected {sorted(known)}")
        for key in ("input", "classes", "layers"):
            if key not in d:
                raise ConfigError(f"config.json: missing key {key!r}")
        try:
            i = d["input"]
            spec = InputSpec(
                int(i["channels"]), int(i["height"]), int(i["width"]), tuple(i["mean"]), tuple(i["std"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"config.json: 'input' needs integer channels, height, width and lists mean, std ({e})"
                              ) from None
        if not isinstance(d["classes"], list) or not isinstance(d["layers"], list):
            raise ConfigError("config.json: 'classes' and 'layers' must be lists")
        layers = [layer_from_dict(x, k) for k, x in enumerate(d["layers"])]
        classes = [str(c) for c in d["classes"]]
        log_z = [float(v) for v in d.get("log_partition") or [0.0] * len(classes)]
        if len(log_z) != len(classes):
            raise ConfigError(
                f"config.json: 'log_partition' has {len(log_z)} values, expected one per class ({len(classes)})"
            )
        sigma2 = float(d.get("sigma2", 1.0))
        if not (math.isfinite(sigma2) and sigma2 > 0):
            raise ConfigError(f"config.json: 'sigma2' must be a positive finite number, got {sigma2!r}")
        th = d.get("threshold")
        fitted = Fitted(
            sigma2=sigma2,
            log_partition=log_z,
            normaliser=str(d.get("normaliser", "none")),
            threshold=Threshold(str(th["score"]), float(th["value"]), float(th.get("tpr", 0.95))) if th else None,
            detector=dict(d.get("detector") or {}),
        )
        cfg = cls(spec, classes, layers, fitted)
        validate(cfg)
        return cfg


def validate(cfg: ModelConfig) -> None:
    """Check that the layer list is a ReLU CNN ending in one linear classifier with matching sizes."""
    layers = cfg.layers
    if not layers or not isinstance(layers[-1], Linear):
        raise ConfigError("layers: the last layer must be a 'linear' classifier")
    names = [layer.name for layer in layers if isinstance(layer, Conv | Linear)]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"layers: duplicate layer names {sorted(dupes)}")
    c, h, w = cfg.input.shape
    if min(c, h, w) < 1:
        raise ConfigError(f"input: channels, height and width must be >= 1, got {cfg.input.shape}")
    flat: int | None = None
    for k, layer in enumerate(layers):
        where = f"layers[{k}] ({layer.type})"
        sizes = {f: getattr(layer, f) for f in ("in_", "out", "kernel", "stride") if hasattr(layer, f)}
        bad = {f.rstrip("_"): v for f, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad or getattr(layer, "padding", 0) < 0:
            raise ConfigError(f"{where}: sizes must be positive integers (padding >= 0), got {bad or layer}")
        if isinstance(layer, Conv):
            if flat is not None:
                raise ConfigError(f"{where}: conv after flatten")
            if layer.in_ != c:
                raise ConfigError(f"{where} {layer.name!r}: 'in' is {layer.in_}, but the input has {c} channels")
            h = (h + 2 * layer.padding - layer.kernel) // layer.stride + 1
            w = (w + 2 * layer.padding - layer.kernel) // layer.stride + 1
            c = layer.out
        elif isinstance(layer, MaxPool):
            h = (h - layer.kernel) // layer.stride + 1
            w = (w - layer.kernel) // layer.stride + 1
        elif isinstance(layer, GlobalAvgPool):
            h = w = 1
        elif isinstance(layer, Flatten):
            flat = c * h * w
        elif isinstance(layer, Linear):
            size = flat if flat is not None else None
            if size is None:
                raise ConfigError(f"{where}: 'linear' needs a 'flatten' before it")
            if layer.in_ != size:
                raise ConfigError(f"{where} {layer.name!r}: 'in' is {layer.in_}, but {size} features arrive")
            flat = layer.out
        if h < 1 or w < 1:
            raise ConfigError(f"{where}: the feature map shrinks to {h}x{w} for input {cfg.input.shape}")
    if flat != len(cfg.classes):
        raise ConfigError(f"layers: the classifier has {flat} outputs but there are {len(cfg.classes)} classes")
