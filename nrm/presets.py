"""Named architectures. Each preset is a function (width multiplier, classes) -> layer list."""

from __future__ import annotations

from collections.abc import Callable

from nrm.config import (
    Conv,
    Flatten,
    GlobalAvgPool,
    InputSpec,
    Layer,
    Linear,
    MaxPool,
    ModelConfig,
    ReLU,
)


def _w(channels: int, width: float) -> int:
    return max(4, round(channels * width))


def _conv_stack(spec: list[tuple[int, int, int] | str], in_ch: int, width: float, classes: int,
                size: int = 0) -> list[Layer]:
    """spec items: (out_channels, kernel, padding) for conv+relu, or "pool" for a 2x2 max-pool.
    ``size`` 0: global average pool + linear; else the map is size x size and the classifier reads
    it whole (flatten + linear), so each class template mu_y keeps a spatial layout."""
    layers: list[Layer] = []
    c, k = in_ch, 0
    for item in spec:
        if isinstance(item, str):  # "pool"
            layers.append(MaxPool(2, 2))
            continue
        out, kernel, pad = item
        k += 1
        layers += [Conv(f"conv{k}", c, _w(out, width), kernel, 1, pad), ReLU()]
        c = _w(out, width)
    if size:
        return [*layers, Flatten(), Linear("classifier", c * size * size, classes)]
    return [*layers, GlobalAvgPool(), Flatten(), Linear("classifier", c, classes)]


def gray28(width: float = 0.5, classes: int = 10) -> ModelConfig:
    """28x28 grayscale (MNIST, Fashion-MNIST): 3x3 convs 32-64-128 with two 2x2 max-pools, global
    average pooling and a linear classifier, all-convolutional like the NRM paper's nets. Its latent
    prior separates Fashion-MNIST from MNIST (AUROC ~0.9, docs/results.md); the flatten head of
    gray28-flat trains to higher accuracy but its latent prior separates far worse."""
    layers = _conv_stack([(32, 3, 1), "pool", (64, 3, 1), "pool", (128, 3, 1)], 1, width, classes)
    return ModelConfig(InputSpec(1, 28, 28, (0.5,), (0.5,)), [str(i) for i in range(classes)], layers)


def gray28_flat(width: float = 0.5, classes: int = 10) -> ModelConfig:
    """gray28 with a third max-pool and a linear classifier on the 3x3 map (spatial class templates)."""
    layers = _conv_stack([(32, 3, 1), "pool", (64, 3, 1), "pool", (128, 3, 1), "pool"], 1, width, classes, size=3)
    return ModelConfig(InputSpec(1, 28, 28, (0.5,), (0.5,)), [str(i) for i in range(classes)], layers)


def rgb32_allconv(width: float = 0.5, classes: int = 10) -> ModelConfig:
    """32x32 RGB, modelled on the NRM paper's all-convolutional CIFAR-10 net (All-Conv-13, max-pool
    variant): 3x conv128, pool, 3x conv256, pool, conv512 3x3 valid, conv256 1x1, conv128 1x1, global
    average pool, linear. Width 0.5 by default (2 cores); width 1.0 is the paper's size."""
    spec: list[tuple[int, int, int] | str] = [
        (128, 3, 1), (128, 3, 1), (128, 3, 1), "pool",
        (256, 3, 1), (256, 3, 1), (256, 3, 1), "pool",
        (512, 3, 0), (256, 1, 0), (128, 1, 0),
    ]
    layers = _conv_stack(spec, 3, width, classes)
    return ModelConfig(InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3), [str(i) for i in range(classes)], layers)


def rgb32_small(width: float = 0.5, classes: int = 10) -> ModelConfig:
    """32x32 RGB, a lighter 6-conv net (64-64-pool-128-128-pool-256-256-pool, linear on the 4x4 map)."""
    spec: list[tuple[int, int, int] | str] = [
        (64, 3, 1), (64, 3, 1), "pool", (128, 3, 1), (128, 3, 1), "pool", (256, 3, 1), (256, 3, 1), "pool",
    ]
    layers = _conv_stack(spec, 3, width, classes, size=4)
    return ModelConfig(InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3), [str(i) for i in range(classes)], layers)


def digits8(width: float = 1.0, classes: int = 10) -> ModelConfig:
    """8x8 grayscale (scikit-learn's digits, the demo): conv16-pool-conv32."""
    layers = _conv_stack([(16, 3, 1), "pool", (32, 3, 1), "pool"], 1, width, classes, size=2)
    return ModelConfig(InputSpec(1, 8, 8, (0.5,), (0.5,)), [str(i) for i in range(classes)], layers)


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "gray28": gray28,
    "gray28-flat": gray28_flat,
    "rgb32-allconv": rgb32_allconv,
    "rgb32-small": rgb32_small,
    "digits8": digits8,
}


def preset(name: str, width: float | None = None, classes: int = 10) -> ModelConfig:
    """Build a named preset; ``width`` None keeps the preset's default width."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(PRESETS)}")
    if width is not None and not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    fn = PRESETS[name]
    return fn(classes=classes) if width is None else fn(width=width, classes=classes)
