"""The ops without parameters or latents: pooling, reshaping, permuting, residual adds, concatenation, slicing, padding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from nrm.ops.base import Op, OpError, Pair, Shape, _layout, _pair, _spread, _transpose2d


@dataclass(frozen=True)
class AvgPool(Op):
    """a(p) = (1 / d_p) sum over the window of z; d_p is torch's divisor (count_include_pad, ceil_mode)."""

    kernel: Pair
    stride: Pair
    padding: Pair = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    type: ClassVar[str] = "avgpool"

    def __post_init__(self) -> None:
        for f in ("kernel", "stride", "padding"):
            object.__setattr__(self, f, _pair(getattr(self, f)))

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.avg_pool2d(xs[0], self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        x = xs[0]
        if self.kernel == self.stride and self.padding == (0, 0) and not self.ceil_mode:
            return [_spread(h, self.kernel, x.shape[-2:])]  # disjoint windows (a ResNet's final pool)
        ones = x.new_ones(1, 1, *x.shape[-2:])
        args = (self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
        divisor = F.avg_pool2d(ones, *args, divisor_override=1) / F.avg_pool2d(ones, *args)  # (1, 1, H', W')
        c = x.shape[1]
        spread = h.new_ones(c, 1, *self.kernel)  # depthwise all-ones kernel
        return [_transpose2d(h / divisor, spread, (x.shape[-2], x.shape[-1]), self.stride, self.padding, (1, 1), c)]


@dataclass(frozen=True)
class GlobalAvgPool(Op):
    """a_c = mean over positions of z_c, kept as a (C, 1, 1) map (adaptive average pooling to 1)."""

    type: ClassVar[str] = "global_avgpool"

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return xs[0].mean(dim=(2, 3), keepdim=True)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        x = xs[0]
        return [h.expand(x.shape) / (x.shape[2] * x.shape[3])]


@dataclass(frozen=True)
class Flatten(Op):
    """(C, H, W) -> (C*H*W,)."""

    type: ClassVar[str] = "flatten"

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return xs[0].flatten(1)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [h.reshape(xs[0].shape)]


@dataclass(frozen=True)
class Reshape(Op):
    """Per-sample reshape to ``shape`` (same number of values)."""

    shape: tuple[int, ...]
    type: ClassVar[str] = "reshape"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    def check(self, shapes: list[Shape]) -> None:
        if math.prod(shapes[0]) != math.prod(self.shape):
            raise OpError(f"reshape to {self.shape} needs {math.prod(self.shape)} values, got {shapes[0]}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return xs[0].reshape(xs[0].shape[0], *self.shape)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [h.reshape(xs[0].shape)]


@dataclass(frozen=True)
class Permute(Op):
    """Per-sample dimensions reordered, a = z.permute(0, 1 + dims) (ShuffleNet's channel shuffle is a
    reshape, a permute and a reshape; ``transpose`` swaps two); the adjoint applies the inverse order."""

    dims: tuple[int, ...]
    type: ClassVar[str] = "permute"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if sorted(self.dims) != list(range(len(self.dims))):
            raise OpError(f"permute needs an order of the per-sample dimensions 0..{len(self.dims) - 1}, got {self.dims}")

    def check(self, shapes: list[Shape]) -> None:
        if len(shapes[0]) != len(self.dims):
            raise OpError(f"permute {self.dims} needs {len(self.dims)} per-sample dimensions, got {shapes[0]}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return xs[0].permute(0, *(d + 1 for d in self.dims))

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        inverse = sorted(range(len(self.dims)), key=lambda k: self.dims[k])
        return [h.permute(0, *(d + 1 for d in inverse))]


@dataclass(frozen=True)
class Add(Op):
    """a = z_1 + z_2 + ... (residual connections); the adjoint sends h to every input."""

    type: ClassVar[str] = "add"
    arity: ClassVar[int | None] = None
    inplace: ClassVar[bool] = True

    def check(self, shapes: list[Shape]) -> None:
        if len(set(shapes)) != 1:
            raise OpError(f"add needs inputs of one shape, got {shapes}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def forward_(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        for x in xs[1:]:
            xs[0].add_(x)
        return xs[0]

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [h] * len(xs)


@dataclass(frozen=True)
class Concat(Op):
    """a = [z_1, z_2, ...] along per-sample dimension ``dim`` (0 = channels); the adjoint splits h."""

    dim: int = 0
    type: ClassVar[str] = "concat"
    arity: ClassVar[int | None] = None

    def check(self, shapes: list[Shape]) -> None:
        rest = {s[: self.dim] + s[self.dim + 1 :] for s in shapes}
        if len(rest) != 1 or not 0 <= self.dim < len(shapes[0]):
            raise OpError(f"concat along dim {self.dim} needs inputs equal in every other dim, got {shapes}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return torch.cat(xs, dim=self.dim + 1)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return list(h.split([x.shape[self.dim + 1] for x in xs], dim=self.dim + 1))


@dataclass(frozen=True)
class Slice(Op):
    """a = z[start:stop:step] per sample dimension (strided subsampling, e.g. x[:, :, ::2, ::2]);
    the adjoint scatters h back to the kept positions and zeros elsewhere."""

    start: tuple[int, ...]
    stop: tuple[int, ...]
    step: tuple[int, ...]
    type: ClassVar[str] = "slice"

    def __post_init__(self) -> None:
        for f in ("start", "stop", "step"):
            object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
        if not len(self.start) == len(self.stop) == len(self.step) or min(self.step, default=1) < 1:
            raise OpError(f"slice needs one start, stop and positive step per dimension, got {self}")

    def check(self, shapes: list[Shape]) -> None:
        if len(shapes[0]) != len(self.start):
            raise OpError(f"slice has {len(self.start)} dimensions, input has shape {shapes[0]}")

    def _index(self) -> tuple[slice, ...]:
        return (slice(None), *(slice(a, b, s) for a, b, s in zip(self.start, self.stop, self.step, strict=True)))

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return xs[0][self._index()]

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        # zeros of the input's shape (xs[0] may be a stand-in) in h's layout, h scattered back into them
        out = torch.empty(xs[0].shape, dtype=h.dtype, device=h.device, memory_format=_layout(h)).zero_()
        out[self._index()] = h
        return [out]


@dataclass(frozen=True)
class Pad(Op):
    """Constant zero padding, ``pad`` in F.pad's order (last dimension first, (before, after) pairs;
    channels too, as the option-A shortcut pads channels); the adjoint crops."""

    pad: tuple[int, ...]
    type: ClassVar[str] = "pad"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pad", tuple(int(v) for v in self.pad))
        if len(self.pad) % 2 or min(self.pad, default=0) < 0:
            raise OpError(f"pad needs (before, after) pairs of non-negative sizes, got {self.pad}")

    def check(self, shapes: list[Shape]) -> None:
        if len(self.pad) // 2 > len(shapes[0]):
            raise OpError(f"pad {self.pad} covers more dimensions than the input {shapes[0]}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.pad(xs[0], self.pad)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [F.pad(h, tuple(-v for v in self.pad))]  # negative padding crops
