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

from dataclasses import fields
from typing import Any

import torch

from nrm.ops.base import Op, OpError, Pair, Shape
from nrm.ops.gates import Clamp, LeakyReLU, MaxPool, ReLU
from nrm.ops.linear import Affine, Conv, Linear
from nrm.ops.structure import Add, AvgPool, Concat, Flatten, GlobalAvgPool, Pad, Permute, Reshape, Slice

__all__ = ["OPS", "Add", "Affine", "AvgPool", "Clamp", "Concat", "Conv", "Flatten", "GlobalAvgPool", "LeakyReLU", "Linear",
           "MaxPool", "Op", "OpError", "Pad", "Pair", "Permute", "ReLU", "Reshape", "Shape", "Slice", "op_from_dict",
           "out_shape"]


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
