"""The Neural Rendering Model: a piecewise-linear network (ReLU, max-pool) read both ways.

Bottom-up (``encode``) it is an ordinary classifier that also records its latent variables: the
ReLU gates s*(l) and the max-pool switches t*(l). Top-down (``render``) it draws an image from the
class template mu_y* through the transposed weights of the same network, eq. (1) of the seed:

    h(l-1) = sum_p T(t*(l, p)) B(l, p) W(l)^T (s*(l, p) h(l, p))

The network is a graph of ops (nrm.graph, nrm.ops: conv, linear, relu, max-pool, average pool,
add, concat, slice, pad, ...), so residual and concatenating networks are NRMs too. ``score`` turns
both passes into the per-sample columns of nrm.scores. Two renderers exist: ``render_explicit``
walks the graph backwards with each op's adjoint (eq. 1 generalised); ``render`` takes one
vector-Jacobian product, since for a piecewise-linear network h(0) = d logit_y* / dx and
eta_l = b(l) . d logit_y* / dz(l). ``score`` takes the explicit walk again, with no autograd records,
on what an in-place forward pass kept (``_reverse``: each ReLU's output, each max-pool's switches),
writing each gradient into memory that nothing else holds. Tests hold the three equal in float64, and
the completeness identity logit_y* = <h(0), x> + sum_l eta_l + c_y* with them.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nrm import scores as S
from nrm.batchnorm import TrainNorm
from nrm.config import ModelConfig, validate
from nrm.detectors import Head
from nrm.graph import INPUT, Node
from nrm.names import PRECISIONS
from nrm.plan import ScorePlan, fitted_columns, known_columns, plan_for

Stats = tuple[Tensor, Tensor]  # (gate rates, act means), each (N, sum_l C_l): NRM.unit_stats
# model -> its torch.compile'd passes by name (see NRM.use_compile): "forward" (score()'s forward-only
# pass) and "full" (the full table's). Kept outside the module so that copy.deepcopy and pickling of
# an NRM never meet a compiled function. What is compiled is an unbound method (NRM._forward_stats,
# NRM._full): a bound one would hold its model, and the entry would never go.
_COMPILED: weakref.WeakKeyDictionary[NRM, dict[str, Any]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on CUDA on (``on``) or off for the duration (restored after).
    Off matters: torch lets cuDNN run float32 convolutions in TF32 by default, which on an H200
    moved latent_prior by 5e-3 relative between two memory formats of the same batch."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _key(name: str) -> str:
    """A node name as a torch module key (torch forbids '.' there)."""
    return name.replace(".", "/")


@dataclass
class Latents:
    """What the bottom-up pass keeps, by node name."""

    logits: Tensor  # (N, K)
    values: dict[str, Tensor]  # every node's output, and the input under nrm.graph.INPUT
    latents: dict[str, Tensor]  # relu / leaky_relu node -> gate s*(l); maxpool node -> switches t*(l)


@dataclass
class Rendering:
    """The top-down pass from class ``y``: h(0) and the per-layer latent prior terms eta_l."""

    y: Tensor  # (N,) class rendered from
    h0: Tensor  # (N, C, H, W) rendered image in normalised input space
    eta_layers: Tensor  # (N, L) b(l)^T (s(l) . h(l)) for each bias layer, in graph order
    eta_channels: Tensor | None = None  # (N, sum_l C_l) the same per output channel c: b_c(l) sum_p (s . h)_{c,p}


class NRM(nn.Module):
    """A piecewise-linear network built from ``ModelConfig.nodes`` that is also its own generative renderer."""

    mean: Tensor  # (1, C, 1, 1) buffers: preprocessing and the fitted normaliser
    std: Tensor
    log_partition: Tensor  # (K,)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.shapes = validate(config)  # per-sample output shape of every node
        self.config = config
        self.params = nn.ModuleDict()
        for node in config.nodes:
            if node.op.params():
                self.params[_key(node.name)] = self._init_params(node)
        spec = config.input
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer(
            "log_partition", torch.tensor(config.fitted.log_partition or [0.0] * len(config.classes)),
            persistent=False,
        )
        # Nodes whose bias is a latent prior parameter b(l): every biased op but the classifier.
        self.bias_nodes = [n.name for n in config.nodes[:-1] if n.op.has_bias()]
        self._last_use = self._plan_frees(config.nodes)
        self._stats_at = self._plan_stats(config.nodes, self.bias_nodes)
        self._index = {n.name: k for k, n in enumerate(config.nodes)}
        self.precision = "fp32"  # see set_precision
        self.channels_last = False  # see use_channels_last
        self.compiled = False  # see use_compile
        self.train_norm: TrainNorm | None = None  # BatchNorm while nrm.training trains with one (nrm.batchnorm)

    def _init_params(self, node: Node) -> nn.Module:
        """torch's own default initialisation of conv and linear (kaiming-uniform weight, bias uniform in
        +-1/sqrt(fan_in)), unit scale and zero shift for an affine op."""
        holder = nn.Module()
        fan_in = 1
        for pname, shape in node.op.params().items():
            t = torch.empty(shape)
            if pname == "weight":
                nn.init.kaiming_uniform_(t, a=5**0.5)
                fan_in = nn.init._calculate_fan_in_and_fan_out(t)[0]
            elif pname == "bias":
                nn.init.uniform_(t, -(fan_in**-0.5), fan_in**-0.5)
            else:
                nn.init.constant_(t, 1.0 if pname == "scale" else 0.0)
            holder.register_parameter(pname, nn.Parameter(t))
        return holder

    @staticmethod
    def _plan_frees(nodes: list[Node]) -> dict[int, list[str]]:
        """node index -> values no later node reads (the plain forward drops them there)."""
        last: dict[str, int] = {}
        for k, n in enumerate(nodes):
            for i in n.inputs:
                last[i] = k
        frees: dict[int, list[str]] = {}
        for name, k in last.items():
            frees.setdefault(k, []).append(name)
        return frees

    @staticmethod
    def _plan_stats(nodes: list[Node], bias_nodes: list[str]) -> dict[str, str]:
        """node -> the bias node whose unit statistics are read from its output: a ReLU that reads
        the bias node (its output is max(z, 0) already: no second positive part), else the bias node."""
        at = {b: b for b in bias_nodes}
        for n in nodes:
            if n.op.positive_part and len(n.inputs) == 1 and at.get(n.inputs[0]) == n.inputs[0]:
                del at[n.inputs[0]]
                at[n.name] = n.inputs[0]
        return at

    def node_params(self, name: str) -> dict[str, Tensor]:
        """The tensors of node ``name`` by param name (weight, bias, scale, shift); {} for none."""
        key = _key(name)
        if key not in self.params:
            return {}
        return dict(self.params[key].named_parameters())

    # ------------------------------------------------------------------ preprocessing
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.config.input.shape

    @property
    def latent_names(self) -> list[str]:
        """The bias nodes' names (module paths of a converted network), in graph order."""
        return list(self.bias_nodes)

    @property
    def classifier(self) -> Node:
        return self.config.nodes[-1]

    def head(self) -> Head:
        """The classifier the detectors are fitted for: the class count and the final layer's weight
        and bias (float64, on the CPU; a zero bias where it has none)."""
        p = self.node_params(self.classifier.name)
        weight = p["weight"].detach().double().cpu()
        bias = p["bias"].detach().double().cpu() if "bias" in p else torch.zeros(weight.shape[0], dtype=torch.float64)
        return Head(len(self.config.classes), weight, bias)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 pixels, (N, H, W) or (N, H, W, C), to normalised float (N, C, H, W) on the model's device."""
        c, h, w = self.input_shape
        if images.dim() == 3 and c == 1:
            images = images.unsqueeze(-1)
        if images.dim() != 4 or tuple(images.shape[1:]) != (h, w, c):
            raise ValueError(
                f"preprocess: got images of shape {tuple(images.shape)}, expected (N, {h}, {w}, {c})"
                + (f" or (N, {h}, {w})" if c == 1 else "")
            )
        if images.dtype != torch.uint8:
            raise ValueError(f"preprocess: got dtype {images.dtype}, expected torch.uint8 pixels")
        x = images.to(self.mean.device).permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0  # (N, C, H, W)
        return (x - self.mean) / self.std

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"got input of shape {tuple(x.shape)}, expected (N, {', '.join(map(str, self.input_shape))})")

    # ------------------------------------------------------------------ bottom-up
    def _run(self, x: Tensor, keep: bool, stats: bool = False, save: bool = False,
             ) -> tuple[Tensor, Latents | None, list[Tensor], Tensor, Stats | None]:
        """The one bottom-up loop over the graph. Returns logits, the latents (when ``keep``, or
        ``save``: see below), the bias nodes' outputs z(l) (when autograd records: the autograd
        renderer differentiates with respect to them), the penultimate features (the classifier's
        input, for the post-hoc detectors) and, with ``stats``, :meth:`unit_stats`, read as each value
        is made. Forward-only and eager, ReLUs and adds write into an input that nothing later reads,
        as torch's in-place ops do (1.8-3x cheaper than a fresh output on a CPU, docs/benchmarks.md).
        With ``save`` the latents hold what the in-place reverse pass reads (:meth:`_reverse`): each
        op's ``reads()`` (a ReLU's output, a max-pool's switches), and as values shape-only stand-ins."""
        overwrite = not (keep or torch.is_grad_enabled() or torch.compiler.is_compiling())
        caller = x.untyped_storage().data_ptr() if overwrite else 0  # never overwritten (dynamo: not traced)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        values: dict[str, Tensor] = {INPUT: x}
        latents: dict[str, Tensor] = {}
        shapes: dict[str, Tensor] = {INPUT: x}  # save: a stand-in of each value (its shape, no memory)
        zs: list[Tensor] = []
        unit: dict[str, tuple[Tensor, Tensor]] = {}
        bias = set(self.bias_nodes)
        norm = self.train_norm
        for k, node in enumerate(self.config.nodes):
            xs, p = [values[i] for i in node.inputs], self.node_params(node.name)
            if k == len(self.config.nodes) - 1:
                feats = xs[0].flatten(1)  # (N, F) penultimate features
            reads = node.op.reads() if save else ""  # what the in-place reverse pass keeps of this node
            if norm is not None and node.name in norm:  # training with BatchNorm: its beta is the bias
                out = norm(node.name, node.op.forward(xs, {"weight": p["weight"]}))
            elif keep or reads == "latent":
                out, lat = node.op.encode(xs, p)
                if lat is not None:
                    latents[node.name] = lat
            elif overwrite and node.op.inplace and self._may_overwrite(k, node, values, caller, latents):
                out = node.op.forward_(xs, p)
            else:
                out = node.op.forward(xs, p)
            values[node.name] = out
            if save:
                shapes[node.name] = out.new_empty(()).expand(out.shape)
                if reads == "output":
                    latents[node.name] = out  # never overwritten later (_may_overwrite)
            if node.name in bias and not overwrite:
                zs.append(out)
            if stats and node.name in self._stats_at:
                unit[self._stats_at[node.name]] = _unit_stats(out, node.op.positive_part)
            if not keep:
                for name in self._last_use.get(k, ()):
                    del values[name]  # nothing later reads it
        logits = values[self.classifier.name]
        st = None
        if stats:  # in bias_nodes order, wherever each was read
            rates, means = zip(*(unit[n] for n in self.bias_nodes), strict=True)
            st = (torch.cat(rates, dim=1), torch.cat(means, dim=1))
        kept = Latents(logits, values, latents) if keep else Latents(logits, shapes, latents) if save else None
        return logits, kept, zs, feats, st

    def _may_overwrite(self, k: int, node: Node, values: dict[str, Tensor], caller: int,
                       saved: dict[str, Tensor]) -> bool:
        """Whether node ``k`` may write into its first input: nothing later reads it, it is not the
        model's input, no live value shares its memory (a slice or a flatten of it), nothing the
        reverse pass reads shares it either (``saved``), and every input has its dtype (under
        autocast an add may mix bf16 and float32)."""
        name = node.inputs[0]
        if name == INPUT or node.inputs.count(name) > 1 or name not in self._last_use.get(k, ()):
            return False
        t = values[name]
        ptr = t.untyped_storage().data_ptr()
        others = [v for n, v in values.items() if n != name] + list(saved.values())
        return (ptr != caller and all(v.dtype == t.dtype for v in (values[i] for i in node.inputs))
                and all(v.untyped_storage().data_ptr() != ptr for v in others))

    def forward(self, x: Tensor) -> Tensor:
        """Plain classifier: normalised images (N, C, H, W) -> logits (N, K)."""
        with self.autocast():
            return self._run(x, keep=False)[0]

    @torch.no_grad()
    def penultimate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features (N, F), logits (N, K)): the classifier's input and output, forward pass only."""
        with self.autocast():
            logits, _, _, feats, _ = self._run(x, keep=False)
        return feats.float(), logits.float()

    def encode(self, x: Tensor) -> Latents:
        """Bottom-up pass that keeps the latent variables z* = {s*(l), t*(l)} and every node's output."""
        return self._run(x, keep=True)[1]  # type: ignore[return-value]

    # ------------------------------------------------------------------ top-down
    def render_explicit(self, lat: Latents, y: Tensor | None = None) -> Rendering:
        """Eq. (1) literally, generalised to a graph: start from the class template at the classifier
        and walk the nodes in reverse, each op's adjoint at the latents of the forward pass (conv:
        every position draws its template W^T h and the templates are placed and summed; relu: the
        gate s*(l); max-pool: each value to its switch t*(l); add: h to every input; concat: split;
        pad: crop; slice: scatter back; average pool: spread evenly). A node read by several others
        sums what they send it. eta_l = sum over channels and positions of b(l) . h at node l's output.
        """
        return self._walk(lat, lat.logits.argmax(1) if y is None else y, reverse=False)

    def _walk(self, lat: Latents, y: Tensor, reverse: bool) -> Rendering:
        """The top-down walk of :meth:`render_explicit`. ``reverse`` (:meth:`_reverse`, on what
        ``_run(save=True)`` kept): each op's ``adjoint_``, and, eager, a gradient that nothing else
        holds is written into (a ReLU's gate applied, a second consumer's part added) instead of
        copied; traced by torch.compile, every step makes a new value and inductor plans the memory."""
        in_place = reverse and not torch.compiler.is_compiling()
        h: dict[str, Tensor] = {self.classifier.name: F.one_hot(y, len(self.config.classes)).to(lat.logits.dtype)}
        eta: dict[str, Tensor] = {}  # per-channel terms (N, C_l); eta_l is their sum
        bias = set(self.bias_nodes)
        for node in reversed(self.config.nodes):
            g = h.pop(node.name, None)
            if g is None:  # nothing downstream depends on this node
                continue
            p = self.node_params(node.name)
            if node.name in bias:
                eta[node.name] = _per_channel(g) * p[node.op.bias]  # type: ignore[index]
            xs, saved = [lat.values[i] for i in node.inputs], lat.latents.get(node.name)
            if reverse:
                parts = node.op.adjoint_(g, xs, p, saved, own=in_place and _holders(g, h) == 0)
            else:
                parts = node.op.adjoint(g, xs, p, saved)
            for name, part in zip(node.inputs, parts, strict=True):
                if reverse and self.channels_last and part.dim() == 4:  # as the forward's values (an
                    part = part.contiguous(memory_format=torch.channels_last)  # average pool's adjoint: NCHW)
                if name not in h:
                    h[name] = part
                elif in_place and _holders(h[name], h) == 1 and h[name].dtype == torch.result_type(h[name], part):
                    h[name].add_(part)
                else:
                    h[name] = h[name] + part
        per_channel = [eta.get(n, lat.logits.new_zeros(len(y), self.shapes[n][0])) for n in self.bias_nodes]
        return self._rendering(y, h[INPUT], per_channel)

    def _rendering(self, y: Tensor, h0: Tensor, per_channel: list[Tensor]) -> Rendering:
        if not per_channel:  # no bias node: eta is zero
            zero = h0.new_zeros(len(y), 0)
            return Rendering(y, h0, zero, zero)
        return Rendering(y, h0, torch.stack([e.sum(1) for e in per_channel], dim=1), torch.cat(per_channel, dim=1))

    def _compiled(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (an unbound method) through torch.compile, once per model and pass ``name``."""
        passes = _COMPILED.setdefault(self, {})
        if name not in passes:
            passes[name] = torch.compile(fn)
        return passes[name]

    def _step(self, x: Tensor, stats: bool) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """score()'s forward-only pass (no backward): logits (N, K), penultimate features (N, F) and,
        with ``stats``, :meth:`unit_stats`; compiled with :meth:`use_compile`."""
        if self.compiled:
            return self._compiled("forward", NRM._forward_stats)(self, x, stats)
        return self._forward_stats(x, stats)

    def _forward_stats(self, x: Tensor, stats: bool) -> tuple[Tensor, Tensor, Stats | None]:
        logits, _, _, feats, st = self._run(x, keep=False, stats=stats)
        return logits, feats, st

    @torch.no_grad()
    def _reverse(self, x: Tensor, stats: bool = False) -> tuple[Tensor, Rendering, Tensor, Stats | None]:
        """score()'s full pass with no autograd: the forward-only pass (in place where it may), keeping
        only what the adjoints read (each ReLU's output, each max-pool's switches), then the top-down
        walk of eq. (1) from y* = argmax with ReLU gradients and the sums at forks written in place.
        The same numbers as :meth:`_vjp` (tests: random graphs, float64), at less memory traffic;
        compiled whole, both passes, with :meth:`use_compile`. Returns what :meth:`_vjp` returns."""
        if self.compiled:
            return self._compiled("full", NRM._full)(self, x, stats)
        return self._full(x, stats)

    def _full(self, x: Tensor, stats: bool) -> tuple[Tensor, Rendering, Tensor, Stats | None]:
        logits, lat, _, feats, st = self._run(x, keep=False, stats=stats, save=True)
        assert lat is not None
        return logits, self._walk(lat, logits.argmax(1), reverse=True), feats, st

    def _vjp(self, x: Tensor, y: Tensor | None, create_graph: bool, stats: bool = False,
             ) -> tuple[Tensor, Rendering, Tensor, Stats | None]:
        """One vector-Jacobian product of logit_y with respect to x and every bias node's output:
        h(0) = d logit_y / dx and eta_{l,c} = b_c(l) sum_p d logit_y / dz(l)_{c,p}. Returns the
        logits, the rendering, the penultimate features and (with ``stats``) the unit statistics of
        the same forward pass. Always eager: inductor's CPU backward of these graphs measured slower
        than autograd's (docs/benchmarks.md section 1b)."""
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits, _, zs, feats, st = self._run(x, keep=False, stats=stats)
            if y is None:
                y = logits.detach().argmax(1)
            picked = logits.gather(1, y[:, None]).sum()
            grads = torch.autograd.grad(picked, [x, *zs], create_graph=create_graph)
        eta = [_per_channel(g) * self.node_params(n)[self._bias_param(n)]  # (N, C_l)
               for n, g in zip(self.bias_nodes, grads[1:], strict=True)]
        return logits, self._rendering(y, grads[0], eta), feats, st

    def _bias_param(self, name: str) -> str:
        return self.config.nodes[self._index[name]].op.bias  # type: ignore[return-value]

    def render(self, x: Tensor, y: Tensor | None = None, create_graph: bool = False) -> Rendering:
        """Fast renderer: h(0) = d logit_y / dx and eta_l = b(l) . d logit_y / dz(l), in one backward
        pass. ``y`` defaults to y* = argmax; ``create_graph`` lets training differentiate through it."""
        return self._vjp(x, y, create_graph)[1]

    def unit_stats(self, zs: list[Tensor]) -> Stats:
        """Per-channel statistics of the bottom-up pass, over spatial positions p, for every bias node:

            gate rate  g_{l,c} = mean_p 1[z(l)_{c,p} > 0]       the ReLU latents s*(l), as on-rates
            act mean   a_{l,c} = mean_p max(z(l)_{c,p}, 0)      the positive part of the activation

        zs are the bias nodes' outputs z(l), (N, C, H, W) or (N, F). Returns two (N, sum_l C_l).
        ``score`` reads the same statistics during its bottom-up pass (:meth:`_run`)."""
        parts = [_unit_stats(z, positive=False) for z in zs]
        return torch.cat([r for r, _ in parts], dim=1), torch.cat([m for _, m in parts], dim=1)

    # ------------------------------------------------------------------ precision and layout
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The numeric precision of every pass: ``self.precision`` fp32 (default: float32 throughout,
        TF32 off on CUDA, cuDNN's convolutions included), bf16 or fp16 (torch.autocast on the model's
        device), or tf32 (float32 storage, TF32 matmuls and convs on CUDA; plain float32 on a CPU)."""
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.mean.device.type, dtype=dtype)
        return _tf32(self.precision == "tf32")

    def set_precision(self, precision: str) -> NRM:
        """Score in ``precision`` (one of PRECISIONS); returns self."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
        self.precision = precision
        return self

    def use_compile(self, on: bool = True) -> NRM:
        """Run score()'s passes through torch.compile (inductor): the forward-only one (the columns
        that need no backward: see :meth:`needs_rendering`) and the full table's (:meth:`_reverse`,
        its forward and top-down walk as one graph). The ReLUs, their gradients, the residual sums and
        the statistics fuse into a few loops around the convolutions, so they cost little. Each new
        input shape compiles once (tens of seconds on a small CPU), so it pays over a long job, not a
        test; scores equal the eager ones to float rounding. :meth:`render` and training stay eager
        (see :meth:`_vjp`). On a CPU inductor writes C++ kernels, so a C++ compiler must run here
        (RuntimeError now, not at the first batch). Returns self."""
        if on and self.mean.device.type == "cpu":
            _check_cpp_compiler()
        self.compiled = on
        _COMPILED.pop(self, None)
        return self

    def use_channels_last(self, on: bool = True) -> NRM:
        """Keep 4-D weights and activations channels-last (NHWC): the faster layout for convs on CPUs
        with oneDNN and on tensor-core GPUs. Returns self."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)  # type: ignore[call-overload]

    def use_fast_layout(self) -> NRM:
        """The memory format that scored faster for this device and precision (set the precision
        first): channels_last on a CPU (oneDNN: ResNet-20 1.6x) and on CUDA for tf32 (H200, ResNets
        at batch 4096) and the half precisions (cuDNN's tensor-core kernels are NHWC ones); NCHW for
        fp32 on CUDA, where cuDNN runs these float32 convolutions with NCHW kernels and channels_last
        only adds layout conversions (H200, batch 4096: NCHW was the plain module's faster format in
        11 of the 12 fp32 rows, and the conversions took 8.8 ms of ResNet-20's 74.7 ms full score;
        docs/benchmarks.md, GPU). Returns self."""
        return self.use_channels_last(self.mean.device.type != "cuda" or self.precision != "fp32")

    # ------------------------------------------------------------------ scores
    @property
    def extra_columns(self) -> list[str]:
        """The fitted columns score() adds after nrm.scores.COLUMNS (nrm.plan.fitted_columns)."""
        return fitted_columns(self.config)

    @property
    def columns(self) -> list[str]:
        """Every column score() can make, in output order."""
        return known_columns(self.config)

    def plan(self, columns: Sequence[str] | None = None, inputs: Iterable[str] = (), flag: bool = True) -> ScorePlan:
        """The plan of a scoring run of this model (nrm.plan.plan_for): every column, or ``columns`` plus
        pred and the threshold column (``flag``), with the passes they need and the threshold."""
        return plan_for(self.config, columns, inputs, flag)

    def flag(self, cols: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(ood_score, is_ood) of score columns ``cols`` by this model's threshold (ScorePlan.flag)."""
        return self.plan().flag(cols)

    @torch.no_grad()
    def score(self, x: Tensor, columns: list[str] | None = None, unit_stats: bool | None = None) -> dict[str, Tensor]:
        """Per-sample score columns of normalised x (N, C, H, W): by default every column of
        ``self.columns`` plus the detectors' inputs the passes made; given ``columns``, exactly those,
        computed with only what they need (no backward pass unless one of them, or its detector, reads
        the top-down pass). ``unit_stats`` adds ``latent_gates`` / ``unit_acts`` (see :meth:`unit_stats`),
        with or without ``columns``; by default they are made only when a fitted detector reads them
        (they cost a pass over every activation)."""
        p = self.plan(columns, ("latent_gates", "unit_acts") if unit_stats else (), flag=False)
        return self.score_plan(x, p)

    def score_plan(self, x: Tensor, plan: ScorePlan) -> dict[str, Tensor]:
        """The score dict of ``plan`` (exactly ``plan.outputs``) for normalised x."""
        self.check_input(x)
        with torch.no_grad(), self.autocast():
            if plan.render:
                logits, r, feats, st = self._reverse(x, plan.unit_stats)
            else:
                (logits, feats, st), r = self._step(x, plan.unit_stats), None
        logits = logits.detach().float()
        out = S.classifier_scores(logits)
        if r is not None:
            out.update(self._rendered_scores(x, r))
        if st is not None:
            out["latent_gates"], out["unit_acts"] = (v.detach().float() for v in st)  # detector inputs only
        out["penultimate"], out["logits"] = feats.detach().float(), logits
        det = self.config.fitted.detector
        if det is not None:
            out.update(det.score(out, set(plan.columns)))  # the fitted detectors' columns (nrm.detectors)
        return {c: out[c] for c in plan.outputs}

    def _rendered_scores(self, x: Tensor, r: Rendering) -> dict[str, Tensor]:
        """The columns of the top-down pass: eta per layer and in all, the latent log-likelihood,
        the reconstruction error and the bound, and (internal) eta per channel for the detectors."""
        fitted = self.config.fitted
        eta_layers = r.eta_layers.detach().float()
        out = {"latent_prior_layers": eta_layers, "latent_prior": S.latent_prior(eta_layers)}
        out["latent_loglik"] = S.latent_loglik(out["latent_prior"], r.y, self.log_partition)
        out["recon_sq_error"] = S.recon_sq_error(x.detach().float(), r.h0.detach().float())
        out["loglik_bound"] = S.loglik_bound(out["recon_sq_error"], out["latent_loglik"], fitted.sigma2)
        out["latent_prior_channels"] = r.eta_channels.detach().float()  # type: ignore[union-attr]
        return out

    def extra_repr(self) -> str:
        return f"input={self.input_shape}, classes={len(self.config.classes)}, latent_layers={self.latent_names}"


def _unit_stats(t: Tensor, positive: bool) -> Stats:
    """(gate rate, act mean), both (N, C), of one bias node (see NRM.unit_stats) from its output z,
    or from max(z, 0) when ``positive`` (a ReLU's output: read, not written). Both come from one
    positive part: its sum, then its sign (= the gate), which beats summing the boolean 1[z > 0]
    4-5x on a CPU (docs/benchmarks.md)."""
    dims = tuple(range(2, t.dim()))  # positions; () for linear features (P = 1)
    p = math.prod(t.shape[2:])
    pos = t.detach() if positive else t.detach().clamp_min(0)  # (N, C, ...) max(z, 0)
    mean = _sum32(pos, dims) / p if dims else pos.to(torch.float32, copy=True)
    gate = torch.sign(pos) if positive else pos.sign_()  # 1[z > 0]
    return (_sum32(gate, dims) / p if dims else gate.float()), mean


def _sum32(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Float32 sums over ``dims``. A bf16 map is summed in its own dtype (torch accumulates in
    float32 and rounds the sum once, 2^-9 relative) and then widened: ``sum(dtype=float32)`` first
    copies the whole map to float32, which cost bf16 scoring more than its sums (docs/benchmarks.md).
    fp16 keeps the float32 sum: a sum of 1,024 activations can pass fp16's largest value."""
    if t.dtype == torch.bfloat16:
        return t.sum(dim=dims).float()
    return t.sum(dim=dims, dtype=torch.float32)


def _check_cpp_compiler() -> None:
    """Raise, in one sentence, when torch.compile cannot build CPU kernels: no C++ compiler runs."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        raise RuntimeError(f"compiling on a CPU needs a C++ compiler, as torch.compile writes C++ kernels, and none "
                           f"runs here ({e}): install g++ (or set CXX) or score without compiling") from None


def _holders(t: Tensor, h: dict[str, Tensor]) -> int:
    """How many of the pending gradients ``h`` share ``t``'s memory (an add sends one to each input)."""
    ptr = t.untyped_storage().data_ptr()
    return sum(v.untyped_storage().data_ptr() == ptr for v in h.values())


def _per_channel(g: Tensor) -> Tensor:
    """Sum over positions: (N, C, H, W) -> (N, C) (in either memory format, no copy); flat features (N, F) stay."""
    return g.sum(dim=tuple(range(2, g.dim()))) if g.dim() > 2 else g
