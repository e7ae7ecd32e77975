"""Named architectures: a registry of functions (width multiplier, classes, ...) -> ModelConfig."""

from __future__ import annotations

from collections.abc import Callable

from nrm.config import InputSpec, ModelConfig
from nrm.graph import INPUT, Node, chain
from nrm.ops import Add, Conv, Flatten, GlobalAvgPool, Linear, MaxPool, Op, Pad, ReLU, Slice


def _w(channels: int, width: float) -> int:
    return max(4, round(channels * width))


def _conv_stack(spec: list[tuple[int, int, int] | str], in_ch: int, width: float, classes: int,
                size: int = 0) -> list[Node]:
    """spec items: (out_channels, kernel, padding) for conv+relu, or "pool" for a 2x2 max-pool.
    ``size`` 0: global average pool + linear; else the map is size x size and the classifier reads
    it whole (flatten + linear), so each class template mu_y keeps a spatial layout."""
    layers: list[Op | tuple[str, Op]] = []
    c, k = in_ch, 0
    for item in spec:
        if isinstance(item, str):  # "pool"
            layers.append(MaxPool(2, 2))
            continue
        out, kernel, pad = item
        k += 1
        layers += [(f"conv{k}", Conv(c, _w(out, width), kernel, 1, pad)), ReLU()]
        c = _w(out, width)
    if size:
        return chain(*layers, Flatten(), ("classifier", Linear(c * size * size, classes)))
    return chain(*layers, GlobalAvgPool(), Flatten(), ("classifier", Linear(c, classes)))


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


def resnet_cifar(width: float = 1.0, classes: int = 10, depth: int = 20) -> ModelConfig:
    """32x32 RGB, the CIFAR ResNet of He et al. (2016): depth 6n + 2 (20, 32, 44, 56, 110), three
    stages of n basic blocks at 16, 32 and 64 channels (times ``width``), "option A" shortcuts
    (strided subsampling plus zero channel padding), global average pooling and a linear classifier.
    Trained here without BatchNorm (the NRM's convs carry biases); nrm.from_torch folds a user's
    BatchNorm into the same graph. Node names follow the original module paths (layer1.0.conv1)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
    blocks = (depth - 2) // 6
    nodes: list[Node] = []

    def add(name: str, op: Op, *inputs: str) -> str:
        nodes.append(Node(name, op, inputs))
        return name

    c = _w(16, width)
    x = add("relu1", ReLU(), add("conv1", Conv(3, c, 3, 1, 1), INPUT))
    for stage, planes in enumerate((16, 32, 64), start=1):
        out = _w(planes, width)
        for b in range(blocks):
            stride = 2 if stage > 1 and b == 0 else 1
            p = f"layer{stage}.{b}"
            h = add(f"{p}.relu1", ReLU(), add(f"{p}.conv1", Conv(c, out, 3, stride, 1), x))
            h = add(f"{p}.conv2", Conv(out, out, 3, 1, 1), h)
            short = x
            if stride != 1 or c != out:  # option A: x[:, :, ::2, ::2] then zero channels on both sides
                sub = add(f"{p}.shortcut.slice", Slice((0, 0, 0), (c, 10**9, 10**9), (1, stride, stride)), x)
                short = add(f"{p}.shortcut.pad", Pad((0, 0, 0, 0, (out - c) // 2, out - c - (out - c) // 2)), sub)
            x = add(f"{p}.relu2", ReLU(), add(f"{p}.add", Add(), h, short))
            c = out
    x = add("flatten", Flatten(), add("avgpool", GlobalAvgPool(), x))
    add("linear", Linear(c, classes), x)
    return ModelConfig(InputSpec(3, 32, 32, (0.5,) * 3, (0.5,) * 3), [str(i) for i in range(classes)], nodes)


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "gray28": gray28,
    "gray28-flat": gray28_flat,
    "rgb32-allconv": rgb32_allconv,
    "rgb32-small": rgb32_small,
    "digits8": digits8,
    "resnet-cifar": resnet_cifar,
}


def preset(name: str, width: float | None = None, classes: int = 10, depth: int | None = None) -> ModelConfig:
    """Build a named preset; ``width`` None keeps the preset's default width; ``depth`` is for the
    ResNet preset only."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(PRESETS)}")
    if width is not None and not width > 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    fn = PRESETS[name]
    extra: dict[str, object] = {} if width is None else {"width": width}
    if depth is not None:
        if name != "resnet-cifar":
            raise ValueError(f"depth is an option of resnet-cifar only, not of {name!r}")
        extra["depth"] = depth
    return fn(classes=classes, **extra)
