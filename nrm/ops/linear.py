"""The ops with weights: convolution, linear and the per-channel affine map (a BatchNorm kept apart)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from nrm.ops.base import Op, OpError, Pair, Shape, _pair


@dataclass(frozen=True)
class Conv(Op):
    """z = W * a + b: any kernel, stride, padding, dilation and groups (depthwise included)."""

    in_: int
    out: int
    kernel: Pair
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias_: bool = True
    type: ClassVar[str] = "conv"
    bias: ClassVar[str | None] = "bias"

    def __post_init__(self) -> None:
        for f in ("kernel", "stride", "padding", "dilation"):
            object.__setattr__(self, f, _pair(getattr(self, f)))
        if min(self.in_, self.out, self.groups, *self.kernel, *self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise OpError(f"conv sizes must be positive (padding >= 0), got {self}")
        if self.in_ % self.groups or self.out % self.groups:
            raise OpError(f"conv: in {self.in_} and out {self.out} must be divisible by groups {self.groups}")

    def params(self) -> dict[str, Shape]:
        w = {"weight": (self.out, self.in_ // self.groups, *self.kernel)}
        return {**w, "bias": (self.out,)} if self.bias_ else w

    def check(self, shapes: list[Shape]) -> None:
        if len(shapes[0]) != 3 or shapes[0][0] != self.in_:
            raise OpError(f"conv expects (C={self.in_}, H, W) inputs, got {shapes[0]}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.conv2d(xs[0], p["weight"], p.get("bias"), self.stride, self.padding, self.dilation, self.groups)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        # W^T h placed back at every window position (the B(l, p) of eq. 1): one transposed convolution
        # that crops the padding, its output padding the input rows no floor-mode window reached
        # (autograd's own input gradient, in the memory format of h and the weight)
        extra = [size - ((o - 1) * s - 2 * pad + d * (k - 1) + 1) for size, o, s, pad, d, k in
                 zip(xs[0].shape[-2:], h.shape[-2:], self.stride, self.padding, self.dilation, self.kernel, strict=True)]
        w = p["weight"].to(h.dtype)  # under autocast the forward ran in h's dtype
        return [F.conv_transpose2d(h, w, None, self.stride, self.padding, tuple(extra), self.groups, self.dilation)]


@dataclass(frozen=True)
class Linear(Op):
    """z = W a + b on flat features."""

    in_: int
    out: int
    bias_: bool = True
    type: ClassVar[str] = "linear"
    bias: ClassVar[str | None] = "bias"

    def params(self) -> dict[str, Shape]:
        return {"weight": (self.out, self.in_), **({"bias": (self.out,)} if self.bias_ else {})}

    def check(self, shapes: list[Shape]) -> None:
        if shapes[0] != (self.in_,):
            raise OpError(f"linear expects ({self.in_},) features, got {shapes[0]}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.linear(xs[0], p["weight"], p.get("bias"))

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [h @ p["weight"]]


@dataclass(frozen=True)
class Affine(Op):
    """z = scale_c a_c + shift_c per channel: a BatchNorm that could not be folded into the op before
    it. Its shift is a latent prior term of its own."""

    channels: int
    type: ClassVar[str] = "affine"
    bias: ClassVar[str | None] = "shift"

    def params(self) -> dict[str, Shape]:
        return {"scale": (self.channels,), "shift": (self.channels,)}

    def check(self, shapes: list[Shape]) -> None:
        if shapes[0][0] != self.channels:
            raise OpError(f"affine expects {self.channels} channels, got {shapes[0]}")

    @staticmethod
    def _view(v: Tensor, x: Tensor) -> Tensor:
        return v.view(-1, *([1] * (x.dim() - 2)))  # (C, 1, 1) for maps, (C,) for features

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        x = xs[0]
        return x * self._view(p["scale"], x) + self._view(p["shift"], x)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [h * self._view(p["scale"], h)]
