"""The ops with latent variables: ReLU and leaky ReLU gates, clamps (ReLU6, Hardtanh) and max-pool switches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from nrm.ops.base import Op, OpError, Pair, _channel_sum, _layout, _pair


@dataclass(frozen=True)
class ReLU(Op):
    """a = s . z with the gate s*(l) = 1[z > 0]."""

    type: ClassVar[str] = "relu"
    inplace: ClassVar[bool] = True
    positive_part: ClassVar[bool] = True

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.relu(xs[0])

    def forward_(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return xs[0].relu_()

    def encode(self, xs: list[Tensor], p: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return F.relu(xs[0]), (xs[0] > 0).to(xs[0].dtype)

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [h * (lat if lat is not None else (xs[0] > 0).to(h.dtype))]

    def reads(self) -> str:
        return "output"  # max(z, 0) > 0 exactly where the gate is open: no gate tensor is made

    def adjoint_(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], saved: Tensor | None, own: bool) -> list[Tensor]:
        assert saved is not None  # the ReLU's output
        if own and h.dtype == saved.dtype:  # autograd's own ReLU gradient, written into h
            return [torch.ops.aten.threshold_backward.grad_input(h, saved, 0, grad_input=h)]
        return [torch.where(saved > 0, h, 0)]


@dataclass(frozen=True)
class LeakyReLU(Op):
    """a = s . z with s*(l) = 1 where z > 0, else the slope."""

    slope: float = 0.01
    type: ClassVar[str] = "leaky_relu"
    inplace: ClassVar[bool] = True

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.leaky_relu(xs[0], self.slope)

    def forward_(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.leaky_relu_(xs[0], self.slope)

    def _gate(self, z: Tensor) -> Tensor:
        return torch.where(z > 0, z.new_tensor(1.0), z.new_tensor(self.slope))

    def encode(self, xs: list[Tensor], p: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return self.forward(xs, p), self._gate(xs[0])

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        return [h * (lat if lat is not None else self._gate(xs[0]))]

    def reads(self) -> str:
        # with slope >= 0 the output is > 0 exactly where z > 0; a negative slope needs the gate itself
        return "output" if self.slope >= 0 else "latent"

    def adjoint_(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], saved: Tensor | None, own: bool) -> list[Tensor]:
        assert saved is not None  # the output (slope >= 0) or the gate
        if self.slope < 0:
            return self.adjoint(h, xs, p, saved)
        if own and h.dtype == saved.dtype:
            return [torch.ops.aten.leaky_relu_backward.grad_input(h, saved, self.slope, True, grad_input=h)]
        return [torch.where(saved > 0, h, h * self.slope)]


@dataclass(frozen=True)
class Clamp(Op):
    """a = min(max(z, lo), hi) (ReLU6 is lo 0, hi 6; nn.Hardtanh): two gates per unit, 1[z > lo] and
    1[z < hi]. Where both are open a = z; where one is shut the unit holds its bound whatever z is,
    a constant like a bias: a = s . z + k with s = 1[lo < z < hi] and k = lo 1[z <= lo] + hi 1[z >= hi].
    So the node is a latent prior term of its own, sum_{c,p} k_{c,p} h_{c,p} (h the gradient at its
    output), which keeps the completeness identity exact (docs/theory.md). Both gates and k are read
    from the output a (a unit is clipped exactly where a <= lo or a >= hi), so the latent ``encode``
    keeps is the output itself. Gates shut at the bounds themselves, as torch's hardtanh gradient."""

    lo: float
    hi: float
    type: ClassVar[str] = "clamp"
    inplace: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise OpError(f"clamp needs finite bounds lo < hi, got lo {self.lo} and hi {self.hi}")

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.hardtanh(xs[0], self.lo, self.hi)

    def forward_(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.hardtanh_(xs[0], self.lo, self.hi)

    def encode(self, xs: list[Tensor], p: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        out = self.forward(xs, p)
        return out, out  # the output: gates and constants are read from it

    def _open(self, a: Tensor) -> Tensor:
        return (a > self.lo) & (a < self.hi)  # both gates open: lo < z < hi

    def reads(self) -> str:
        return "output"

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        a = lat if lat is not None else self.forward(xs, p)
        return [torch.where(self._open(a), h, 0)]

    def adjoint_(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], saved: Tensor | None, own: bool) -> list[Tensor]:
        assert saved is not None  # the output: a <= lo exactly where z <= lo, a >= hi where z >= hi
        if own and h.dtype == saved.dtype:  # autograd's own hardtanh gradient, written into h
            return [torch.ops.aten.hardtanh_backward.grad_input(h, saved, self.lo, self.hi, grad_input=h)]
        return self.adjoint(h, xs, p, saved)

    def has_prior(self) -> bool:
        return True

    def prior(self, g: Tensor, p: dict[str, Tensor], out: Tensor | None) -> Tensor:
        assert out is not None  # the output a: k = a where a gate is shut, 0 where both are open
        return _channel_sum(torch.where(self._open(out), 0, out) * g)


@dataclass(frozen=True)
class MaxPool(Op):
    """a(p) = z(t*(l, p)): the switch t* is the argmax of each window (padding never wins)."""

    kernel: Pair
    stride: Pair
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    ceil_mode: bool = False
    type: ClassVar[str] = "maxpool"

    def __post_init__(self) -> None:
        for f in ("kernel", "stride", "padding", "dilation"):
            object.__setattr__(self, f, _pair(getattr(self, f)))

    def _args(self) -> tuple[Any, ...]:
        return (self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        return F.max_pool2d(xs[0], *self._args())

    def encode(self, xs: list[Tensor], p: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return F.max_pool2d(xs[0], *self._args(), return_indices=True)

    def reads(self) -> str:
        return "latent"  # the switches

    def adjoint_(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], saved: Tensor | None, own: bool) -> list[Tensor]:
        # autograd's own max-pool gradient: each value to its switch, in h's memory format; it reads
        # its input for the shape and layout only (an unwritten buffer of that size)
        like = torch.empty(xs[0].shape, dtype=h.dtype, device=h.device, memory_format=_layout(h))
        return [torch.ops.aten.max_pool2d_with_indices_backward(h, like, *self._args(), saved)]

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        x = xs[0]
        if lat is None:
            lat = self.encode(xs, p)[1]
        assert lat is not None
        flat = h.new_zeros(*h.shape[:2], x.shape[-2] * x.shape[-1])  # (N, C, H*W)
        return [flat.scatter_add(2, lat.flatten(2), h.flatten(2)).view(x.shape)]  # each value to its switch
