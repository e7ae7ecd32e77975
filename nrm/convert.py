"""nrm.from_torch: turn a user's pretrained nn.Sequential-style ReLU CNN into an NRM, no retraining."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nrm.config import (
    Conv,
    Flatten,
    GlobalAvgPool,
    InputSpec,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool,
    ModelConfig,
    ReLU,
)
from nrm.model import NRM

SUPPORTED = "Conv2d, BatchNorm2d (eval), ReLU, LeakyReLU, MaxPool2d, AdaptiveAvgPool2d(1), Flatten, Linear, Dropout, Identity"


def _square(value: int | Sequence[int], what: str, mod: nn.Module) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"{mod}: {what} {tuple(value)} is not square; NRM supports square {what}s only")
    return int(value[0])


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def from_torch(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> NRM:
    """Convert ``module`` (an nn.Sequential, nesting allowed) with input (C, H, W) into an NRM.

    BatchNorm2d after a conv is folded into the conv's weight and bias, so b(l) is the bias of the
    piecewise-linear network that actually runs. ``mean``/``std`` describe the normalisation of
    [0, 1] pixels the module was trained with (default: none, mean 0 and std 1).
    """
    c = input_shape[0]
    layers: list[Layer] = []
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    n_conv = n_lin = 0
    for k, mod in enumerate(_leaves(module)):
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or _square(mod.dilation, "dilation", mod) != 1 or mod.padding_mode != "zeros":
                raise ValueError(f"module #{k} {mod}: only groups=1, dilation=1, zero padding are supported")
            if isinstance(mod.padding, str):
                raise ValueError(f"module #{k} {mod}: string padding {mod.padding!r}; give an integer")
            n_conv += 1
            name = f"conv{n_conv}"
            layers.append(Conv(name, mod.in_channels, mod.out_channels, _square(mod.kernel_size, "kernel", mod),
                               _square(mod.stride, "stride", mod), _square(mod.padding, "padding", mod)))
            bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_channels)
            weights[name] = (mod.weight.detach().clone(), bias.clone())
        elif isinstance(mod, nn.BatchNorm2d):
            if mod.training:
                raise ValueError(f"module #{k} {mod} is in training mode; call module.eval() before from_torch")
            if not layers or not isinstance(layers[-1], Conv):
                raise ValueError(f"module #{k} {mod}: BatchNorm2d must directly follow a Conv2d to be folded")
            if mod.running_mean is None or mod.running_var is None:
                raise ValueError(f"module #{k} {mod} has no running statistics (track_running_stats=False); cannot fold")
            name = layers[-1].name
            w, b = weights[name]
            scale = (mod.weight.detach() if mod.affine else 1.0) / torch.sqrt(mod.running_var + mod.eps)
            shift = mod.bias.detach() if mod.affine else 0.0
            weights[name] = (w * scale.view(-1, 1, 1, 1), (b - mod.running_mean) * scale + shift)
        elif isinstance(mod, nn.ReLU):
            layers.append(ReLU())
        elif isinstance(mod, nn.LeakyReLU):
            layers.append(LeakyReLU(float(mod.negative_slope)))
        elif isinstance(mod, nn.MaxPool2d):
            if mod.padding not in (0, (0, 0)) or mod.dilation not in (1, (1, 1)) or mod.ceil_mode:
                raise ValueError(f"module #{k} {mod}: only padding=0, dilation=1, ceil_mode=False are supported")
            kernel = _square(mod.kernel_size, "kernel", mod)
            layers.append(MaxPool(kernel, _square(mod.stride if mod.stride is not None else kernel, "stride", mod)))
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            if mod.output_size not in (1, (1, 1)):
                raise ValueError(f"module #{k} {mod}: only AdaptiveAvgPool2d(1) (global average pooling) is supported")
            layers.append(GlobalAvgPool())
        elif isinstance(mod, nn.Flatten):
            layers.append(Flatten())
        elif isinstance(mod, nn.Linear):
            n_lin += 1
            name = f"linear{n_lin}"
            layers.append(Linear(name, mod.in_features, mod.out_features))
            bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_features)
            weights[name] = (mod.weight.detach().clone(), bias.clone())
        elif isinstance(mod, nn.Dropout | nn.Identity):
            continue
        else:
            raise ValueError(f"module #{k} {type(mod).__name__} ({mod}) is not supported; supported: {SUPPORTED}")
    if not layers or not isinstance(layers[-1], Linear):
        raise ValueError("the module must end with an nn.Linear classifier")
    n_classes = layers[-1].out
    names = [str(x) for x in classes] if classes is not None else [str(i) for i in range(n_classes)]
    spec = InputSpec(c, input_shape[1], input_shape[2], tuple(mean or (0.0,) * c), tuple(std or (1.0,) * c))
    nrm = NRM(ModelConfig(spec, names, layers))
    with torch.no_grad():
        for name, (w, b) in weights.items():
            mod = nrm.layer(name)
            mod.weight.copy_(w)
            assert mod.bias is not None  # NRM layers always carry a bias
            mod.bias.copy_(b)
    return nrm
