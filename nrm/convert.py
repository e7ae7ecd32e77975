"""nrm.from_torch: turn a user's piecewise-linear PyTorch classifier into an NRM, no retraining.

The module is traced with torch.fx and its graph rewritten node by node into nrm.ops. The trace runs
on a copy of the module whose tensors are meta tensors (shapes, no data), so every traced value knows
its shape: ``x.shape``, ``x.size(3)`` and ``x.ndim`` are the example's numbers, and code that asserts or
branches on sizes (timm's ``_assert(x.ndim == 4)``) traces to a graph without them. BatchNorm is folded
into the conv or linear before it with torch's own fusion helpers, in float64, then cast to the
module's dtype; where it cannot be (its input is read elsewhere too, or no conv/linear precedes it) it
becomes a per-channel affine op whose shift is a latent prior term of its own. Dropout and identities
vanish (eval mode). The NRM keeps the module's dtype. Anything that is not piecewise-linear is refused
with one sentence naming the op, the module path and why; the graph is scanned for such ops first, so
the refusal names the op that rules the network out, not an unsupported one before it.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from nrm.config import InputSpec, ModelConfig
from nrm.conversion import NOT_PIECEWISE_LINEAR, ConversionError, _Converter
from nrm.model import NRM


class _Proxy(fx.Proxy):
    """A traced value that carries what it stands for on the meta copy (``value``: a meta tensor, a tuple
    of them, or None where that op could not run on meta tensors). Its shape is concrete."""

    value: Any = None

    def _known(self) -> Tensor | None:
        return self.value if isinstance(self.value, Tensor) else None

    @property
    def shape(self) -> Any:
        t = self._known()
        return t.shape if t is not None else self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})

    @property
    def ndim(self) -> Any:
        t = self._known()
        return t.dim() if t is not None else self.tracer.create_proxy("call_function", getattr, (self, "ndim"), {})

    def size(self, dim: int | None = None) -> Any:
        t = self._known()
        if t is None:
            return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})
        return t.shape if dim is None else t.shape[dim]

    def dim(self) -> Any:
        t = self._known()
        return t.dim() if t is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def __len__(self) -> int:
        if isinstance(self.value, Tensor | tuple | list):
            return len(self.value)
        raise fx.proxy.TraceError("len() of a traced value whose size is unknown")

    def __iter__(self) -> Any:
        if isinstance(self.value, tuple | list):  # x1, x2 = x.chunk(2, dim=1)
            return iter([self[i] for i in range(len(self.value))])  # type: ignore[index]
        return self.tracer.iter(self)


class _Tracer(fx.Tracer):
    """fx tracer over the meta copy of the module: each op also runs on meta tensors as it is recorded,
    so each traced value knows its shape (:class:`_Proxy`). Non-piecewise-linear modules are leaves
    even when they subclass torch's (torchvision's LayerNorm2d), so that the refusal names them. It
    remembers which module is being traced, for the control-flow error."""

    path = ""  # the innermost module being traced when an error unwinds

    def __init__(self, example: Tensor):
        # math is not wrapped (fx's default): sizes are concrete here, and a patched math.prod seen by
        # torch._dynamo's first import (a meta kernel can import it mid-trace) breaks torch.compile later
        super().__init__(autowrap_modules=())  # type: ignore[arg-type]
        self.example = example  # a meta tensor, the traced module's input
        self._evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, NOT_PIECEWISE_LINEAR) or super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:  # a module run on meta tensors reads its own (meta) parameters
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        value = self._evaluate(kind, target, args, kwargs)
        if isinstance(proxy, _Proxy):
            proxy.value = value
        proxy.node.meta["value"] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What the op gives on meta tensors, or None where it cannot run on them (or a value it reads is
        unknown); the converter then names the op it cannot read."""
        if kind == "placeholder":
            return self.example
        if kind == "output":
            return None
        unknown = False

        def value(a: Any) -> Any:
            nonlocal unknown
            if isinstance(a, fx.Proxy):
                v = getattr(a, "value", None)
                unknown = unknown or v is None
                return v
            return a

        vals, kw = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
        if unknown:
            return None
        if _keeps_shape(self.root, kind, target) and isinstance(vals[0], Tensor):
            return vals[0]  # BatchNorm's meta kernel is a slow Python decomposition; its shape is its input's
        self._evaluating = True
        try:
            if kind == "get_attr":
                return operator.attrgetter(target)(self.root)
            if kind == "call_function":
                return target(*vals, **kw)
            if kind == "call_method":
                return getattr(vals[0], target)(*vals[1:], **kw)
            return type(m := self.root.get_submodule(target)).forward(m, *vals, **kw)  # call_module
        except Exception:  # an op with no meta kernel: its value stays unknown
            return None
        finally:
            self._evaluating = False

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


def _keeps_shape(root: nn.Module, kind: str, target: Any) -> bool:
    """Whether the op's output has its first input's shape and dtype: eval-mode BatchNorm, dropout, identity."""
    if kind == "call_function":
        return target in (F.batch_norm, F.dropout, F.dropout2d)
    if kind == "call_module":
        return isinstance(root.get_submodule(target), nn.BatchNorm1d | nn.BatchNorm2d | nn.Dropout | nn.Dropout2d
                          | nn.Identity)
    return False


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (shape and dtype, no data): the
    trace runs every op on it for the shapes, at no cost, and leaves the user's module untouched."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        return copy.deepcopy(module, memo)
    except Exception as e:
        raise ConversionError(f"<top>: the module cannot be copied to trace it ({type(e).__name__}: {e}); "
                              f"copy.deepcopy(module) must work") from None


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's floating parameters (the first one's; buffers where it has none), float32
    for a module without any."""
    floating = (t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point())
    return next((t.dtype for t in floating), torch.float32)


def from_torch(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> NRM:
    """Convert ``module`` (any piecewise-linear network of the supported ops) with input (C, H, W).

    ``mean``/``std`` describe the normalisation of [0, 1] pixels the module was trained with (default:
    none, mean 0 and std 1). The NRM has the module's dtype (:func:`module_dtype`). Raises
    ConversionError naming the first non-piecewise-linear op, or else the first op that cannot be
    converted."""
    if any(m.training for m in module.modules()):
        raise ConversionError("the module is in training mode; call module.eval() before from_torch")
    dtype = module_dtype(module)
    # batch 3: told apart from every per-sample size
    tracer = _Tracer(torch.empty(3, *input_shape, dtype=dtype, device="meta"))
    graph = tracer.trace(_meta_copy(module))
    conv = _Converter(graph, dict(module.named_modules()), module, tracer.node_name_to_scope, batch=3, dtype=dtype)
    conv.check_piecewise_linear()
    nodes, tensors = conv.run()
    c = input_shape[0]
    names = [str(x) for x in classes] if classes is not None else [str(i) for i in range(conv.n_classes)]
    spec = InputSpec(c, input_shape[1], input_shape[2], tuple(mean or (0.0,) * c), tuple(std or (1.0,) * c))
    nrm = NRM(ModelConfig(spec, names, nodes)).to_dtype(dtype)
    with torch.no_grad():
        for node in nodes:
            for pname, t in nrm.node_params(node.name).items():
                t.copy_(tensors[node.name][pname])
    return nrm.eval().requires_grad_(False)


def state_dict_prefix_free(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict without DataParallel's ``module.`` prefix (when every key has it)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state
