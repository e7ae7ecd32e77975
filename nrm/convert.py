"""nrm.from_torch: turn a user's piecewise-linear PyTorch classifier into an NRM, no retraining.

The module is traced with torch.fx and its graph rewritten node by node into nrm.ops, with shapes
from one example pass (so ``x.size(3)`` and ``x.view(x.size(0), -1)`` become constants). BatchNorm
is folded into the conv or linear before it with torch's own fusion helpers; where it cannot be
(its input is read elsewhere too, or no conv/linear precedes it) it becomes a per-channel affine op
whose shift is a latent prior term of its own. Dropout and identities vanish (eval mode). Anything
that is not piecewise-linear is refused with one sentence naming the op, the module path and why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from nrm.config import InputSpec, ModelConfig
from nrm.graph import INPUT, Node
from nrm.model import NRM
from nrm.ops import (
    Add,
    Affine,
    AvgPool,
    Concat,
    Conv,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    Linear,
    MaxPool,
    Op,
    Pad,
    ReLU,
    Reshape,
    Slice,
)

SUPPORTED = ("Conv2d, Linear, BatchNorm (eval), ReLU, LeakyReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, add, "
             "cat, slicing, F.pad (constant 0), flatten/view/reshape, Dropout, Identity")
NOT_PIECEWISE_LINEAR = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.ELU, nn.SELU, nn.CELU,
                        nn.Mish, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.GLU, nn.LayerNorm, nn.GroupNorm,
                        nn.MultiheadAttention, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
_SMOOTH_FUNCTIONS = {F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softmax, torch.softmax,
                     F.log_softmax, torch.log_softmax, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardswish,
                     F.hardsigmoid, torch.exp, torch.log, F.layer_norm, F.group_norm, operator.mul, torch.mul,
                     operator.truediv, torch.div, torch.matmul, operator.matmul, torch.bmm}


class ConversionError(ValueError):
    """A module that cannot be read as an NRM; the message names the op, the module path and why."""


def _refuse(path: str, what: str, why: str) -> ConversionError:
    return ConversionError(f"{path or '<top>'}: {what} is {why}, so the module cannot be converted to an NRM "
                           f"(supported: {SUPPORTED})")


class _Tracer(fx.Tracer):
    """fx tracer that remembers which module is being traced, for the control-flow error."""

    path = ""  # the innermost module being traced when an error unwinds

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        outer, self.path = self.path, self.path_of_module(m)
        result = super().call_module(m, forward, args, kwargs)
        self.path = outer  # not restored on an error: the error names the module it came from
        return result

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        try:
            return super().trace(root, concrete_args)
        except fx.proxy.TraceError as e:
            path = self.path
            raise ConversionError(f"{path or '<top>'}: control flow on tensor values (an if, loop or bool() on a "
                                  f"traced tensor) cannot be converted: an NRM is one fixed piecewise-linear graph "
                                  f"({e})") from None


def from_torch(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> NRM:
    """Convert ``module`` (any piecewise-linear network of the supported ops) with input (C, H, W).

    ``mean``/``std`` describe the normalisation of [0, 1] pixels the module was trained with (default:
    none, mean 0 and std 1). Raises ConversionError naming the first op that cannot be converted."""
    if any(m.training for m in module.modules()):
        raise ConversionError("the module is in training mode; call module.eval() before from_torch")
    tracer = _Tracer()
    graph = tracer.trace(module)
    gm = fx.GraphModule(module, graph)
    scope = tracer.node_name_to_scope
    example = torch.randn(3, *input_shape)  # batch 3: told apart from every per-sample size
    ShapeProp(gm).propagate(example)
    conv = _Converter(gm, scope, batch=3)
    nodes, tensors = conv.run()
    c = input_shape[0]
    n_classes = nodes[-1].op.out if isinstance(nodes[-1].op, Linear) else 0
    names = [str(x) for x in classes] if classes is not None else [str(i) for i in range(n_classes)]
    spec = InputSpec(c, input_shape[1], input_shape[2], tuple(mean or (0.0,) * c), tuple(std or (1.0,) * c))
    nrm = NRM(ModelConfig(spec, names, nodes))
    with torch.no_grad():
        for node in nodes:
            for pname, t in nrm.node_params(node.name).items():
                t.copy_(tensors[node.name][pname])
    return nrm.eval().requires_grad_(False)


class _Converter:
    """One pass over the fx graph: each fx node becomes an nrm node, an alias of one, or a constant."""

    def __init__(self, gm: fx.GraphModule, scope: dict[str, tuple[str, Any]], batch: int):
        self.gm, self.scope, self.batch = gm, scope, batch
        self.modules = dict(gm.named_modules())
        self.nodes: list[Node] = []
        self.tensors: dict[str, dict[str, Tensor]] = {}
        self.env: dict[fx.Node, Any] = {}  # fx node -> nrm node name (str wrapped in _Ref) or a constant
        self.users: dict[str, int] = {}

    def run(self) -> tuple[list[Node], dict[str, dict[str, Tensor]]]:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if self.env:
                    raise _refuse("", f"a second input {n.name!r}", "not supported (one image tensor in)")
                self.env[n] = _Ref(INPUT)
            elif n.op == "output":
                out = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
                if not isinstance(out, _Ref) or not isinstance(self._node(out.name).op, Linear):
                    raise _refuse("", "the output", "not a linear classifier's logits (the network must end in nn.Linear)")
                self._move_last(out.name)
            else:
                self.env[n] = self._convert(n)
        return self.nodes, self.tensors

    # ------------------------------------------------------------------ helpers
    def _path(self, n: fx.Node) -> str:
        return str(n.target) if n.op == "call_module" else self.scope.get(n.name, ("", None))[0]

    def _label(self, n: fx.Node) -> str:
        """A node name: the module path for modules, path + function name for functions."""
        path = self._path(n)
        base = str(n.target) if n.op == "call_module" else (f"{path}.{n.name}" if path else n.name)
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
            self.tensors[name] = {k: v.detach().clone().float() for k, v in params.items()}
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
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise _refuse(self._path(n), f"{n.target}", "not a tensor op")
        return tuple(meta.shape)

    # ------------------------------------------------------------------ dispatch
    def _convert(self, n: fx.Node) -> Any:
        if n.op == "get_attr":
            raise _refuse(self._path(n), f"the parameter or buffer {n.target!r} used directly", "not supported")
        args = [self._value(a) for a in n.args]
        kwargs = {k: self._value(v) for k, v in n.kwargs.items()}
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
            return self._batchnorm(n, m, x)
        if isinstance(m, nn.ReLU):
            return self._add(n, ReLU(), [x])
        if isinstance(m, nn.LeakyReLU):
            return self._add(n, LeakyReLU(float(m.negative_slope)), [x])
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
        if args and not _holds_ref(args) and not _holds_ref(list(kwargs.values())):
            return fn(*args, **kwargs)  # arithmetic on sizes: a constant
        if fn in (F.relu, torch.relu):
            return self._add(n, ReLU(), [args[0]])
        if fn is F.leaky_relu:
            return self._add(n, LeakyReLU(float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))),
                             [args[0]])
        if fn in (operator.add, operator.iadd, torch.add):
            return self._add_op(n, args, kwargs)
        if fn in (torch.cat, torch.concat):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self._add(n, Concat(self._sample_dim(n, dim)), list(args[0]))
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
        if fn in (operator.mul, torch.mul, operator.truediv, torch.div, torch.matmul, operator.matmul, torch.bmm):
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

    def _batchnorm(self, n: fx.Node, m: nn.BatchNorm1d | nn.BatchNorm2d, x: _Ref) -> _Ref:
        path = str(n.target)
        if m.running_mean is None or m.running_var is None:
            raise _refuse(path, type(m).__name__ + " without running statistics", "not foldable (track_running_stats"
                          "=False normalises by each batch, which is not a fixed affine map)")
        prev = self._node(x.name) if x.name != INPUT else None
        src = n.args[0]
        only_user = isinstance(src, fx.Node) and len(src.users) == 1 and self.users.get(x.name, 0) == 0
        if prev is not None and only_user and isinstance(prev.op, Conv | Linear) and prev.name in self.tensors:
            p = self.tensors[prev.name]
            fuse = fuse_conv_bn_weights if isinstance(prev.op, Conv) else fuse_linear_bn_weights
            w, b = fuse(p["weight"], p.get("bias"), m.running_mean, m.running_var, m.eps,
                        m.weight if m.affine else torch.ones_like(m.running_mean),
                        m.bias if m.affine else torch.zeros_like(m.running_mean))
            self.nodes[self.nodes.index(prev)] = Node(prev.name, _with_bias(prev.op), prev.inputs)
            self.tensors[prev.name] = {"weight": w.detach().float(), "bias": b.detach().float()}
            return x
        scale = (m.weight.detach() if m.affine else 1.0) / torch.sqrt(m.running_var + m.eps)
        shift = (m.bias.detach() if m.affine else 0.0) - m.running_mean * scale
        return self._add(n, Affine(m.num_features), [x], {"scale": scale, "shift": shift})


class _Ref:
    """What an fx tensor node became: the name of an nrm node (or the graph input)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _weights(m: nn.Conv2d | nn.Linear) -> dict[str, Tensor]:
    return {"weight": m.weight} if m.bias is None else {"weight": m.weight, "bias": m.bias}


def _holds_ref(args: Any) -> bool:
    """Whether an argument (nested in tuples or lists) is or holds a converted tensor."""
    if isinstance(args, _Ref):
        return True
    return isinstance(args, tuple | list) and any(_holds_ref(a) for a in args)


def _with_bias(op: Conv | Linear) -> Conv | Linear:
    from dataclasses import replace

    return replace(op, bias_=True)


def _as_pair(size: Any, current: tuple[int, ...]) -> tuple[int, int]:
    s = (size, size) if isinstance(size, int) else tuple(size)
    return (int(s[0] if s[0] is not None else current[0]), int(s[1] if s[1] is not None else current[1]))


def _pool_args(args: list[Any], kwargs: dict[str, Any], names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
    """Positional-or-keyword pooling arguments in ``names`` order; stride None or () means the kernel."""
    out = [args[i + 1] if i + 1 < len(args) else kwargs.get(k, d) for i, (k, d) in enumerate(zip(names, defaults,
                                                                                                    strict=True))]
    if out[1] in (None, (), []):
        out[1] = out[0]
    return out


def state_dict_prefix_free(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict without DataParallel's ``module.`` prefix (when every key has it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state

