"""The op vocabulary of an NRM graph: the one place that knows each op.

Every op is a small frozen dataclass of its attributes with four readings of the same piecewise-linear
map, all on per-sample shapes (the batch dimension is never part of an attribute):

    params()                 the tensors it owns, by name and shape (conv: weight, bias)
    forward(xs, p)           the bottom-up map; ``encode`` also returns its latent variable
                             (ReLU gate s*(l), max-pool switch t*(l)) or None; ``forward_``
                             (ops with ``inplace``) the same map written into xs[0]
    adjoint(h, xs, p, lat)   the top-down map of eq. (1): the transpose of the op at the latents
                             fixed by the forward pass, one tensor per input
    adjoint_(h, xs, p, saved, own)
                             the same map for the in-place reverse pass (NRM.score): ``xs`` may be
                             shape-only stand-ins, ``saved`` is what ``reads()`` names ("output": the
                             op's own output, "latent": what ``encode`` returns), and with ``own``
                             it may write into h
    bias                     the name of the param that is a latent prior term b(l), or None
    prior(g, p, out)         the node's latent prior term per output channel, (N, C), from
                             g = d logit_y / d(its output): b_c(l) sum_p g_{c,p} for a bias; a
                             clamp's is what its clipped units hold (see Clamp)

Piecewise-linear only: with the latents fixed, every op is affine, so the adjoint of the whole
graph is the vector-Jacobian product and the completeness identity holds (docs/theory.md). ``OPS`` maps each op's
JSON ``type`` to its class; ``op_from_dict`` is the only way back from JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

Shape = tuple[int, ...]  # per sample: (C, H, W) or (F,)
Pair = Any  # an int or an (h, w) pair when given; always stored as a tuple[int, int] (__post_init__)


class OpError(ValueError):
    """An op whose attributes or inputs do not fit; the caller adds the node's name."""


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int | float):
        return (int(v), int(v))
    if len(v) != 2:
        raise OpError(f"expected an int or a pair, got {v!r}")
    return (int(v[0]), int(v[1]))


class Op:
    """Base: an op with one input, no params, no latent and no bias."""

    type: ClassVar[str]
    arity: ClassVar[int | None] = 1  # None: any number >= 2
    bias: ClassVar[str | None] = None
    inplace: ClassVar[bool] = False  # has forward_, which overwrites xs[0] (the caller checks it may)
    positive_part: ClassVar[bool] = False  # its output is max(input, 0)

    def params(self) -> dict[str, Shape]:
        return {}

    def check(self, shapes: list[Shape]) -> None:
        """Raise OpError when the input shapes do not fit the attributes (before the shape is run)."""

    def forward(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def encode(self, xs: list[Tensor], p: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return self.forward(xs, p), None

    def forward_(self, xs: list[Tensor], p: dict[str, Tensor]) -> Tensor:
        """forward, written into xs[0] and returned (ops with ``inplace`` only)."""
        raise NotImplementedError

    def adjoint(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], lat: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def reads(self) -> str:
        """What :meth:`adjoint_` reads of the forward pass besides the shapes of the inputs: ""
        (nothing), "output" (this op's own output) or "latent" (the latent :meth:`encode` returns)."""
        return ""

    def adjoint_(self, h: Tensor, xs: list[Tensor], p: dict[str, Tensor], saved: Tensor | None, own: bool) -> list[Tensor]:
        """:meth:`adjoint` for the in-place reverse pass: ``xs`` may be stand-ins that carry only their
        shapes, ``saved`` is what :meth:`reads` names, and with ``own`` (nothing else holds ``h``) the
        result may be written into ``h``. Ops whose adjoint reads only shapes need not override it."""
        return self.adjoint(h, xs, p, saved)

    def has_bias(self) -> bool:
        return self.bias is not None and self.bias in self.params()

    def has_prior(self) -> bool:
        """Whether the node is a latent prior term: a bias b(l), or a constant its latents choose."""
        return self.has_bias()

    def prior(self, g: Tensor, p: dict[str, Tensor], out: Tensor | None) -> Tensor:
        """The latent prior term per output channel, (N, C): b_c(l) sum_p g_{c,p}, with g (N, C, ...)
        = d logit_y / d(this node's output). ``out`` is the node's output (a clamp reads it)."""
        return _channel_sum(g) * p[self.bias]  # type: ignore[index]

    def to_dict(self) -> dict[str, Any]:
        return {k.rstrip("_"): list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]


def _transpose2d(h: Tensor, weight: Tensor, size: tuple[int, int], stride: tuple[int, int],
                 padding: Pair, dilation: tuple[int, int], groups: int) -> Tensor:
    """W^T h placed back at every window position (the B(l, p) of eq. 1), cropped to the input size.

    The transposed convolution of h without padding, then the padding rows and columns cut off
    (and zero rows added where a floor-mode window never reached the input's last rows). Average
    pooling's adjoint, whose ceil mode can give h more rows than a convolution would; a
    convolution's (:meth:`Conv.adjoint`) crops and pads inside the one transposed convolution."""
    full = F.conv_transpose2d(h, weight, None, stride, 0, 0, groups, dilation)  # (N, C_in, H', W')
    (ph, pw), (hh, ww) = padding, size
    full = F.pad(full, (0, max(0, pw + ww - full.shape[-1]), 0, max(0, ph + hh - full.shape[-2])))
    return full[..., ph : ph + hh, pw : pw + ww]


def _spread(h: Tensor, kernel: tuple[int, int], size: tuple[int, ...]) -> Tensor:
    """The adjoint of an average pool whose windows tile the input (stride = kernel, no padding, floor
    mode): each value of h (N, C, H', W') spread evenly over its kh x kw window, (N, C, H, W) with the
    rows and columns no window reached left zero. A copy of h, not the depthwise transposed convolution
    of the general case (which costs 160 ms for a ResNet's 8 x 8 pool at batch 512 in bf16 on a CPU)."""
    (kh, kw), (n, c, hh, ww) = kernel, h.shape
    out = (h / (kh * kw))[:, :, :, None, :, None].expand(n, c, hh, kh, ww, kw).reshape(n, c, hh * kh, ww * kw)
    return F.pad(out, (0, size[1] - ww * kw, 0, size[0] - hh * kh))


def _channel_sum(g: Tensor) -> Tensor:
    """Sum over positions: (N, C, H, W) -> (N, C) (in either memory format, no copy); (N, F) stays."""
    return g.sum(dim=tuple(range(2, g.dim()))) if g.dim() > 2 else g


def _layout(h: Tensor) -> torch.memory_format:
    """The memory format of a map ``h``: channels-last when it is laid out so (NCHW otherwise)."""
    return torch.channels_last if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


# ---------------------------------------------------------------------------- affine ops with params
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


# ---------------------------------------------------------------------------- latent ops
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


# ---------------------------------------------------------------------------- linear structure
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


OPS: dict[str, type[Op]] = {c.type: c for c in (Conv, Linear, Affine, ReLU, LeakyReLU, Clamp, MaxPool, AvgPool,
                                                  GlobalAvgPool, Flatten, Reshape, Permute, Add, Concat, Slice, Pad)}


def op_from_dict(kind: str, attrs: dict[str, Any]) -> Op:
    """Build op ``kind`` from its JSON attributes; OpError names an unknown type or attribute."""
    cls = OPS.get(kind)
    if cls is None:
        raise OpError(f"unknown op {kind!r}; expected one of {sorted(OPS)}")
    names = {f.name.rstrip("_"): f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown := sorted(set(attrs) - set(names)):
        raise OpError(f"{kind}: unknown attribute(s) {unknown}; expected {sorted(names)}")
    try:
        return cls(**{names[k]: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()})
    except TypeError as e:
        raise OpError(f"{kind}: {e}") from None


def out_shape(op: Op, shapes: list[Shape]) -> Shape:
    """The op's per-sample output shape, by running it on meta tensors (torch's own size rules)."""
    if op.arity is not None and len(shapes) != op.arity:
        raise OpError(f"{op.type} takes {op.arity} input(s), got {len(shapes)}")
    if op.arity is None and len(shapes) < 2:
        raise OpError(f"{op.type} takes two or more inputs, got {len(shapes)}")
    op.check(shapes)
    xs = [torch.empty(1, *s, device="meta") for s in shapes]
    p = {k: torch.empty(s, device="meta") for k, s in op.params().items()}
    try:
        y = op.forward(xs, p)
    except (RuntimeError, ValueError, IndexError) as e:
        raise OpError(f"{op.type} does not fit input shape(s) {shapes}: {str(e).splitlines()[0]}") from None
    if y.numel() == 0:
        raise OpError(f"{op.type} shrinks input shape(s) {shapes} to nothing ({tuple(y.shape[1:])})")
    return tuple(y.shape[1:])
