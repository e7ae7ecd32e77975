"""The base of every op (``Op``), its error, and the helpers the ops' adjoints share."""

from __future__ import annotations

from dataclasses import asdict
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
