"""The rewrite behind nrm.from_torch: a traced module's fx graph, one torch call at a time, into NRM
nodes (nrm.ops), with BatchNorm folded where it can be; and the refusal of what is not piecewise-linear."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from nrm.graph import INPUT, Node
from nrm.ops import (
    Add,
    Affine,
    AvgPool,
    Clamp,
    Concat,
    Conv,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    Linear,
    MaxPool,
    Op,
    Pad,
    Permute,
    ReLU,
    Reshape,
    Slice,
)

SUPPORTED = ("Conv2d, Linear, BatchNorm (eval), ReLU, LeakyReLU, ReLU6/Hardtanh, MaxPool2d, AvgPool2d, "
             "AdaptiveAvgPool2d, add, cat, chunk/split, slicing, F.pad (constant 0), flatten/view/reshape, "
             "permute/transpose, Dropout, Identity")
NOT_PIECEWISE_LINEAR = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.ELU, nn.SELU, nn.CELU,
                        nn.Mish, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.GLU, nn.LayerNorm, nn.GroupNorm,
                        nn.MultiheadAttention, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_SMOOTH_FUNCTIONS = {F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softmax, torch.softmax,
                     F.log_softmax, torch.log_softmax, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardswish,
                     F.hardsigmoid, torch.exp, torch.log, F.layer_norm, F.group_norm, operator.mul, torch.mul,
                     operator.truediv, torch.div, torch.matmul, operator.matmul, torch.bmm}
_PRODUCTS = {operator.mul, torch.mul, operator.truediv, torch.div, torch.matmul, operator.matmul, torch.bmm}
_SMOOTH_METHODS = ("sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "exp", "exp_", "log", "log_")


class ConversionError(ValueError):
    """A module that cannot be read as an NRM; the message names the op, the module path and why."""


def _refuse(path: str, what: str, why: str) -> ConversionError:
    return ConversionError(f"{path or '<top>'}: {what} is {why}, so the module cannot be converted to an NRM "
                           f"(supported: {SUPPORTED})")


class _Converter:
    """One pass over the fx graph: each fx node becomes an nrm node, an alias of one, or a constant."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], root: nn.Module,
                 scope: dict[str, tuple[str, Any]], batch: int, dtype: torch.dtype):
        self.graph, self.modules, self.root, self.scope = graph, modules, root, scope
        self.batch, self.dtype = batch, dtype
        self.n_classes = 0  # the logits' width, read at the output
        self.nodes: list[Node] = []
        self.tensors: dict[str, dict[str, Tensor]] = {}
        self.env: dict[fx.Node, Any] = {}  # fx node -> nrm node name (str wrapped in _Ref) or a constant
        self.users: dict[str, int] = {}

    def check_piecewise_linear(self) -> None:
        """Refuse, naming it, the first op of the graph that is not piecewise-linear (before converting,
        so that an unsupported op earlier in the graph, such as a ViT's class token, is not what the
        refusal names)."""
        for n in self.graph.nodes:
            if n.op == "call_module" and isinstance(m := self.modules.get(str(n.target)), NOT_PIECEWISE_LINEAR):
                raise _refuse(str(n.target), type(m).__name__, "not piecewise-linear")
            if n.op == "call_function" and n.target in _SMOOTH_FUNCTIONS - _PRODUCTS:
                raise _refuse(self._path(n), getattr(n.target, "__name__", str(n.target)), "not piecewise-linear")
            if n.op == "call_method" and n.target in _SMOOTH_METHODS:
                raise _refuse(self._path(n), f"tensor.{n.target}", "not piecewise-linear")

    def run(self) -> tuple[list[Node], dict[str, dict[str, Tensor]]]:
        for n in self.graph.nodes:
            if n.op == "placeholder":
                if self.env:
                    raise _refuse("", f"a second input {n.name!r}", "not supported (one image tensor in)")
                self.env[n] = _Ref(INPUT)
            elif n.op == "output":
                self._output(n)
            else:
                self.env[n] = self._convert(n)
        return self.nodes, self.tensors

    def _output(self, n: fx.Node) -> None:
        """The returned tensor must be the logits, (N, K), made by the graph: its node goes last."""
        src = n.args[0]
        out = self.env[src] if isinstance(src, fx.Node) else None
        value = src.meta.get("value") if isinstance(src, fx.Node) else None
        shape = tuple(value.shape) if isinstance(value, Tensor) else None
        if not isinstance(out, _Ref) or out.name == INPUT or shape is None or len(shape) != 2:
            got = f"shape {shape} for a batch of {self.batch}" if shape else "not one tensor"
            raise _refuse("", "the output", f"not the logits, one (N, K) tensor (got {got})")
        self.n_classes = shape[1]
        self._move_last(out.name)

    # ------------------------------------------------------------------ helpers
    def _path(self, n: fx.Node) -> str:
        return str(n.target) if n.op == "call_module" else self.scope.get(n.name, ("", None))[0]

    def _label(self, n: fx.Node) -> str:
        """A node name: the module path for modules, path + function name for functions."""
        path = self._path(n)
        if n.op == "call_module" or (n.target is F.batch_norm and path):  # timm's BatchNormAct2d: its path
            base = path
        else:
            base = f"{path}.{n.name}" if path else n.name
        name, k = base, 1
        while any(x.name == name for x in self.nodes):
            k += 1
            name = f"{base}_{k}"
        return name

    def _node(self, name: str) -> Node:
        return next(x for x in self.nodes if x.name == name)

    def _move_last(self, name: str) -> None:
        node = self._node(name)
        self.nodes.remove(node)
        self.nodes.append(node)

    def _add(self, n: fx.Node, op: Op, inputs: list[_Ref], params: dict[str, Tensor] | None = None) -> _Ref:
        name = self._label(n)
        self.nodes.append(Node(name, op, tuple(r.name for r in inputs)))
        for r in inputs:
            self.users[r.name] = self.users.get(r.name, 0) + 1
        if params:
            self.tensors[name] = {k: v.detach().to(self.dtype, copy=True) for k, v in params.items()}
        return _Ref(name)

    def _value(self, a: Any) -> Any:
        """An argument with fx nodes replaced by what they became (refs or constants)."""
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, tuple | list):
            return type(a)(self._value(x) for x in a)
        if isinstance(a, slice):
            return slice(self._value(a.start), self._value(a.stop), self._value(a.step))
        return a

    def _shape(self, n: fx.Node) -> tuple[int, ...]:
        value = n.meta.get("value")
        if not isinstance(value, Tensor):
            raise _refuse(self._path(n), f"{getattr(n.target, '__name__', n.target)}", "not an op whose output "
                          "shape could be read (it did not run on meta tensors)")
        return tuple(value.shape)

    # ------------------------------------------------------------------ dispatch
    def _convert(self, n: fx.Node) -> Any:
        if n.op == "get_attr":
            return _Param(str(n.target))
        args = [self._value(a) for a in n.args]
        kwargs = {k: self._value(v) for k, v in n.kwargs.items()}
        if n.target is not F.batch_norm and (p := _first(_Param, [args, list(kwargs.values())])) is not None:
            raise _refuse(self._path(n), f"the parameter or buffer {p.target!r} used directly", "not supported "
                          "(only through the module that owns it, or F.batch_norm)")
        if n.op == "call_module":
            return self._module(n, self.modules[str(n.target)], args)
        if n.op == "call_method":
            return self._method(n, str(n.target), args, kwargs)
        return self._function(n, n.target, args, kwargs)  # type: ignore[arg-type]

    def _module(self, n: fx.Node, m: nn.Module, args: list[Any]) -> Any:
        x = args[0]
        path = str(n.target)
        if isinstance(m, nn.Dropout | nn.Dropout2d | nn.Identity):
            return x
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise _refuse(path, f"Conv2d with padding {m.padding!r} mode {m.padding_mode!r}", "not supported "
                              "(integer zero padding only)")
            bias = m.bias is not None
            op = Conv(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias)
            return self._add(n, op, [x], _weights(m))
        if isinstance(m, nn.Linear):
            return self._add(n, Linear(m.in_features, m.out_features, m.bias is not None), [x], _weights(m))
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            return self._bn_module(n, m, x)
        if isinstance(m, nn.ReLU):
            return self._add(n, ReLU(), [x])
        if isinstance(m, nn.LeakyReLU):
            return self._add(n, LeakyReLU(float(m.negative_slope)), [x])
        if isinstance(m, nn.Hardtanh):  # nn.ReLU6 too
            return self._add(n, Clamp(m.min_val, m.max_val), [x])
        if isinstance(m, nn.MaxPool2d):
            return self._add(n, MaxPool(m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation, m.ceil_mode), [x])
        if isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                raise _refuse(path, "AvgPool2d with divisor_override", "not supported")
            return self._add(n, AvgPool(m.kernel_size, m.stride or m.kernel_size, m.padding, m.ceil_mode,
                                        m.count_include_pad), [x])
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self._adaptive(n, x, m.output_size)
        if isinstance(m, nn.Flatten):
            return self._reshape(n, x)
        why = "not piecewise-linear" if isinstance(m, NOT_PIECEWISE_LINEAR) else "not supported by the NRM converter"
        return self._fail(path, type(m).__name__, why)

    def _fail(self, path: str, what: str, why: str) -> Any:
        raise _refuse(path, what, why)

    def _function(self, n: fx.Node, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        path = self._path(n)
        if fn is operator.getitem:
            return self._getitem(n, args[0], args[1])
        if fn is getattr and args[1] in ("shape", "ndim") and isinstance(args[0], _Ref):
            shape = torch.Size(self._shape(n.args[0]))  # type: ignore[arg-type]
            return shape if args[1] == "shape" else len(shape)
        if args and _first(_Ref, [args, list(kwargs.values())]) is None:
            return fn(*args, **kwargs)  # arithmetic on sizes: a constant
        if fn in (F.relu, torch.relu):
            return self._add(n, ReLU(), [args[0]])
        if fn is F.relu6:
            return self._add(n, Clamp(0.0, 6.0), [args[0]])
        if fn is F.hardtanh:
            lo, hi = _args(args, kwargs, ("min_val", "max_val"), (-1.0, 1.0))
            return self._add(n, Clamp(lo, hi), [args[0]])
        if fn is F.batch_norm:
            mean, var, weight, bias, training, _, eps = _args(args, kwargs, (
                "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                (None, None, None, None, False, 0.1, 1e-5))
            if training or mean is None or var is None:
                raise _refuse(path, "F.batch_norm with batch statistics", "not foldable (training=True or no "
                              "running statistics normalises by each batch, which is not a fixed affine map)")
            t = [None if v is None else self._tensor(v) for v in (mean, var, weight, bias)]
            return self._batchnorm(n, args[0], t[0], t[1], t[2], t[3], float(eps))  # type: ignore[arg-type]
        if fn in (torch.permute, torch.transpose):
            return self._permute(n, args[0], "permute" if fn is torch.permute else "transpose", args[1:], kwargs)
        if fn in (torch.chunk, torch.split):
            return self._pieces(n, args[0])
        if fn is F.leaky_relu:
            return self._add(n, LeakyReLU(float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))),
                             [args[0]])
        if fn in (operator.add, operator.iadd, torch.add):
            return self._add_op(n, args, kwargs)
        if fn in (torch.cat, torch.concat):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            parts = list(args[0])
            if not all(isinstance(a, _Ref) for a in parts):
                raise _refuse(path, "cat of something other than traced tensors", "not supported")
            if len(parts) == 1:  # DenseNet's first layer concatenates a one-element list: the tensor itself
                return parts[0]
            return self._add(n, Concat(self._sample_dim(n, dim)), parts)
        if fn is F.pad:
            return self._pad(n, args, kwargs)
        if fn in (F.max_pool2d, torch.max_pool2d):
            return self._add(n, MaxPool(*_pool_args(args, kwargs, ("kernel_size", "stride", "padding", "dilation",
                                                                    "ceil_mode"), (None, None, 0, 1, False))),
                             [args[0]])
        if fn is F.avg_pool2d:
            k, s, p, ceil, cip, div = _pool_args(args, kwargs, ("kernel_size", "stride", "padding", "ceil_mode",
                                                              "count_include_pad", "divisor_override"),
                                                 (None, None, 0, False, True, None))
            if div is not None:
                raise _refuse(path, "avg_pool2d with divisor_override", "not supported")
            return self._add(n, AvgPool(k, s, p, ceil, cip), [args[0]])
        if fn is F.adaptive_avg_pool2d:
            return self._adaptive(n, args[0], args[1] if len(args) > 1 else kwargs["output_size"])
        if fn in (torch.flatten, torch.reshape):
            return self._reshape(n, args[0])
        if fn in (F.dropout, F.dropout2d):
            return args[0]
        what = getattr(fn, "__name__", str(fn))
        why = "not piecewise-linear" if fn in _SMOOTH_FUNCTIONS else "not supported by the NRM converter"
        if fn in _PRODUCTS:
            why = "not piecewise-linear (a product of two activations, or scaling the NRM cannot read)"
        return self._fail(path, what, why)

    def _method(self, n: fx.Node, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        if name == "size" or name == "dim":
            shape = self._shape(n.args[0])  # type: ignore[arg-type]
            if name == "dim":
                return len(shape)
            return torch.Size(shape) if len(args) < 2 and "dim" not in kwargs else shape[args[1] if len(args) > 1 else kwargs["dim"]]
        if name in ("view", "reshape", "flatten"):
            return self._reshape(n, x)
        if name in ("contiguous", "clone", "detach"):
            return x
        if name in ("relu", "relu_"):
            return self._add(n, ReLU(), [x])
        if name in ("permute", "transpose"):
            return self._permute(n, x, name, args[1:], kwargs)
        if name in ("chunk", "split"):
            return self._pieces(n, x)
        if name in ("add", "add_", "__add__", "__iadd__"):
            return self._add_op(n, args, kwargs)
        if name == "mean":
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            if dims is not None and sorted(int(d) % 4 for d in (dims if isinstance(dims, tuple | list) else [dims])) == [2, 3]:
                ref = self._add(n, GlobalAvgPool(), [x])
                if not (kwargs.get("keepdim") or (len(args) > 2 and args[2])):
                    return self._add(n, Flatten(), [ref])
                return ref
        why = "not piecewise-linear" if name in ("sigmoid", "tanh", "softmax", "exp", "log", "mul", "div") \
            else "not supported by the NRM converter"
        return self._fail(self._path(n), f"tensor.{name}", why)

    # ------------------------------------------------------------------ ops with arguments to read
    def _add_op(self, n: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> _Ref:
        alpha = kwargs.get("alpha", 1)
        refs = [a for a in args if isinstance(a, _Ref)]
        if len(refs) != 2 or alpha != 1:
            raise _refuse(self._path(n), "add of a constant (or with alpha)", "not supported (a bias the NRM cannot "
                          "place)")
        return self._add(n, Add(), refs)

    def _tensor(self, p: Any) -> Tensor:
        """The tensor a get_attr node reads, from the user's module (not the meta copy that was traced)."""
        if not isinstance(p, _Param):
            raise ConversionError(f"expected a parameter or buffer of the module, got {p!r}")
        try:
            tensor: Tensor = operator.attrgetter(p.target)(self.root)
            return tensor.detach()
        except AttributeError:
            raise _refuse("", f"the tensor {p.target!r}", "not a parameter or buffer of the module (a constant "
                          "made while tracing)") from None

    def _permute(self, n: fx.Node, x: _Ref, kind: str, rest: list[Any], kwargs: dict[str, Any]) -> _Ref:
        """x.permute(dims) / torch.permute(x, dims) / transpose(d0, d1): the batch dimension must stay first."""
        rank = len(self._shape(n.args[0]))  # type: ignore[arg-type]
        if kind == "transpose":
            d0, d1 = _args([None, *rest], kwargs, ("dim0", "dim1"), (None, None))
            order = list(range(rank))
            order[d0 % rank], order[d1 % rank] = order[d1 % rank], order[d0 % rank]
        else:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], tuple | list) else rest or kwargs["dims"]
            order = [int(d) % rank for d in dims]
        if order[0] != 0:
            raise _refuse(self._path(n), f"{kind} {order}", "not supported (it moves the batch dimension)")
        return self._add(n, Permute(tuple(d - 1 for d in order[1:])), [x])

    def _pieces(self, n: fx.Node, x: _Ref) -> _Pieces:
        """chunk / split along a per-sample dimension: the pieces' ranges, read from the traced values; each
        piece becomes a slice node where it is taken (``x1, x2 = x.chunk(2, dim=1)``)."""
        value, src = n.meta.get("value"), self._shape(n.args[0])  # type: ignore[arg-type]
        if not isinstance(value, tuple | list) or not value:
            raise _refuse(self._path(n), f"{getattr(n.target, '__name__', n.target)}", "not readable here")
        dims = [d for d in range(len(src)) if any(v.shape[d] != src[d] for v in value)] or [1]
        if dims[0] == 0 or len(dims) > 1:
            raise _refuse(self._path(n), "chunk or split along the batch dimension", "not supported")
        starts = list(itertools.accumulate((v.shape[dims[0]] for v in value), initial=0))
        return _Pieces(x, src, dims[0], list(zip(starts[:-1], starts[1:], strict=True)))

    def _sample_dim(self, n: fx.Node, dim: int) -> int:
        rank = len(self._shape(n))
        d = dim % rank
        if d == 0:
            raise _refuse(self._path(n), "an op along the batch dimension", "not supported")
        return d - 1

    def _reshape(self, n: fx.Node, x: _Ref) -> _Ref:
        shape = self._shape(n)
        if shape[0] != self.batch:
            raise _refuse(self._path(n), "a reshape that mixes samples of the batch", "not supported")
        src = self._shape(n.args[0])  # type: ignore[arg-type]
        if len(shape) == 2 and len(src) >= 2:
            return self._add(n, Flatten(), [x]) if len(src) == 4 else x
        return self._add(n, Reshape(shape[1:]), [x])

    def _adaptive(self, n: fx.Node, x: _Ref, size: Any) -> _Ref:
        (h, w), (oh, ow) = self._shape(n.args[0])[-2:], _as_pair(size, self._shape(n.args[0])[-2:])  # type: ignore[arg-type]
        if (oh, ow) == (1, 1):
            return self._add(n, GlobalAvgPool(), [x])
        if h % oh or w % ow:
            raise _refuse(self._path(n), f"adaptive average pooling {h}x{w} -> {oh}x{ow}", "not supported "
                          "(windows of unequal size; use output 1 or a divisor of the input size)")
        return self._add(n, AvgPool((h // oh, w // ow), (h // oh, w // ow)), [x])

    def _pad(self, n: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> _Ref:
        pad = tuple(args[1] if len(args) > 1 else kwargs["pad"])
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", 0)
        if mode != "constant" or value not in (0, 0.0, None):
            raise _refuse(self._path(n), f"F.pad mode {mode!r} value {value!r}", "not piecewise-linear in the NRM's "
                          "sense (only constant zero padding keeps completeness)")
        if len(pad) // 2 >= len(self._shape(n)):
            raise _refuse(self._path(n), "padding of the batch dimension", "not supported")
        return self._add(n, Pad(pad), [args[0]])

    def _getitem(self, n: fx.Node, x: Any, index: Any) -> Any:
        if isinstance(x, _Pieces):  # one piece of a chunk or split: a slice of its source
            lo, hi = x.ranges[index]
            start, stop = [0] * (len(x.shape) - 1), list(x.shape[1:])
            start[x.dim - 1], stop[x.dim - 1] = lo, hi
            return self._add(n, Slice(tuple(start), tuple(stop), (1,) * len(start)), [x.source])
        if not isinstance(x, _Ref):
            return x[index]  # indexing a size or a tuple: a constant
        src = self._shape(n.args[0])  # type: ignore[arg-type]
        idx = index if isinstance(index, tuple) else (index,)
        if Ellipsis in idx or any(not isinstance(i, slice) for i in idx) or idx[0] != slice(None):
            raise _refuse(self._path(n), f"indexing {index!r}", "not supported (only slices that keep the batch "
                          "dimension, such as x[:, :, ::2, ::2])")
        full = list(idx[1:]) + [slice(None)] * (len(src) - len(idx))
        ranges = [s.indices(size) for s, size in zip(full, src[1:], strict=True)]
        return self._add(n, Slice(*zip(*ranges, strict=True)), [x])

    def _bn_module(self, n: fx.Node, m: nn.BatchNorm1d | nn.BatchNorm2d, x: _Ref) -> _Ref:
        if m.running_mean is None or m.running_var is None:
            raise _refuse(str(n.target), type(m).__name__ + " without running statistics", "not foldable ("
                          "track_running_stats=False normalises by each batch, which is not a fixed affine map)")
        weight, bias = (m.weight, m.bias) if m.affine else (None, None)
        return self._batchnorm(n, x, m.running_mean, m.running_var, weight, bias, m.eps)

    def _batchnorm(self, n: fx.Node, x: _Ref, mean: Tensor, var: Tensor, weight: Tensor | None,
                   bias: Tensor | None, eps: float) -> _Ref:
        """Eval-mode BatchNorm, folded into the conv or linear before it where that is its only reader,
        else an affine node; either way computed in float64 and cast to the module's dtype."""
        mean, var = mean.detach().double(), var.detach().double()
        weight = torch.ones_like(mean) if weight is None else weight.detach().double()
        bias = torch.zeros_like(mean) if bias is None else bias.detach().double()
        prev = self._node(x.name) if x.name != INPUT else None
        src = n.args[0]
        only_user = isinstance(src, fx.Node) and len(src.users) == 1 and self.users.get(x.name, 0) == 0
        if prev is not None and only_user and isinstance(prev.op, Conv | Linear) and prev.name in self.tensors:
            p = self.tensors[prev.name]
            fuse = fuse_conv_bn_weights if isinstance(prev.op, Conv) else fuse_linear_bn_weights
            b0 = p["bias"].double() if "bias" in p else None
            w, b = fuse(p["weight"].double(), b0, mean, var, eps, weight, bias)
            self.nodes[self.nodes.index(prev)] = Node(prev.name, _with_bias(prev.op), prev.inputs)
            self.tensors[prev.name] = {"weight": w.detach().to(self.dtype), "bias": b.detach().to(self.dtype)}
            return x
        scale = weight / torch.sqrt(var + eps)
        return self._add(n, Affine(len(mean)), [x], {"scale": scale, "shift": bias - mean * scale})


class _Ref:
    """What an fx tensor node became: the name of an nrm node (or the graph input)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _weights(m: nn.Conv2d | nn.Linear) -> dict[str, Tensor]:
    return {"weight": m.weight} if m.bias is None else {"weight": m.weight, "bias": m.bias}


class _Param:
    """What a get_attr node became: the dotted path of a parameter or buffer of the module."""

    __slots__ = ("target",)

    def __init__(self, target: str):
        self.target = target


class _Pieces:
    """What chunk / split became: the source, its per-sample shape (with the batch first) and the
    (start, stop) of each piece along per-sample-plus-one dimension ``dim``; indexed by getitem."""

    def __init__(self, source: _Ref, shape: tuple[int, ...], dim: int, ranges: list[tuple[int, int]]):
        self.source, self.shape, self.dim, self.ranges = source, shape, dim, ranges


def _first(cls: type, args: Any) -> Any:
    """The first instance of ``cls`` in an argument (nested in tuples or lists), or None."""
    if isinstance(args, cls):
        return args
    if isinstance(args, tuple | list):
        return next((f for a in args if (f := _first(cls, a)) is not None), None)
    return None


def _with_bias(op: Conv | Linear) -> Conv | Linear:
    from dataclasses import replace

    return replace(op, bias_=True)


def _as_pair(size: Any, current: tuple[int, ...]) -> tuple[int, int]:
    s = (size, size) if isinstance(size, int) else tuple(size)
    return (int(s[0] if s[0] is not None else current[0]), int(s[1] if s[1] is not None else current[1]))


def _args(args: list[Any], kwargs: dict[str, Any], names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
    """A function's positional-or-keyword arguments after its input, in ``names`` order."""
    return [args[i + 1] if i + 1 < len(args) else kwargs.get(k, d)
            for i, (k, d) in enumerate(zip(names, defaults, strict=True))]


def _pool_args(args: list[Any], kwargs: dict[str, Any], names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
    """Positional-or-keyword pooling arguments in ``names`` order; stride None or () means the kernel."""
    out = _args(args, kwargs, names, defaults)
    if out[1] in (None, (), []):
        out[1] = out[0]
    return out
