"""The Neural Rendering Model: a piecewise-linear network (ReLU, max-pool) read both ways.

Bottom-up (``encode``) it is an ordinary classifier that also records its latent variables: the
ReLU gates s*(l) and the max-pool switches t*(l). Top-down (``render``) it draws an image from the
class template mu_y* through the transposed weights of the same network, eq. (1) of the seed:

    h(l-1) = sum_p T(t*(l, p)) B(l, p) W(l)^T (s*(l, p) h(l, p))

The network is a graph of ops (nrm.graph, nrm.ops: conv, linear, relu, clamp, max-pool, average pool,
add, concat, slice, pad, permute, ...), so residual and concatenating networks are NRMs too. ``score`` turns
both passes into the per-sample columns of nrm.scores (which columns, and which passes they need:
nrm.plan). Three renderers compute the same top-down pass:

- ``render_explicit``: eq. (1) generalised, walking the graph backwards with each op's adjoint;
- ``render`` / ``autograd_pass``: one vector-Jacobian product, since for a piecewise-linear network
  h(0) = d logit_y* / dx and eta_l = b(l) . d logit_y* / dz(l) (training differentiates through it);
- ``full_pass``: the explicit walk with no autograd records, on what an in-place forward pass kept
  (each ReLU's output, each max-pool's switches), writing each gradient into memory that nothing
  else holds: what scoring runs.

Tests hold the three equal in float64, and the completeness identity logit_y* = <h(0), x> + sum_l
eta_l + c_y* with them. How a model runs (device, precision, memory layout, torch.compile) is
nrm.runner's; the model's own passes run eagerly in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nrm import precision, scores
from nrm.batchnorm import TrainNorm
from nrm.config import ModelConfig, validate
from nrm.detectors import Head
from nrm.graph import INPUT, Node
from nrm.plan import ScorePlan, fitted_columns, known_columns, plan_for

Stats = tuple[Tensor, Tensor]  # (gate rates, act means), each (N, sum_l C_l): NRM.unit_stats
Keep = Literal["none", "reverse", "all"]  # what the bottom-up pass keeps (NRM._bottom_up)


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


@dataclass
class Pass:
    """What a scoring pass computed: what :meth:`NRM.tabulate` turns into columns."""

    logits: Tensor  # (N, K)
    features: Tensor  # (N, F) the classifier's input (penultimate features)
    rendering: Rendering | None = None  # the top-down pass from y* = argmax, when it ran
    stats: Stats | None = None  # NRM.unit_stats of the same bottom-up pass, when asked


@dataclass
class _BottomUp:
    logits: Tensor  # (N, K)
    features: Tensor  # (N, F)
    latents: Latents | None  # with keep "all" or "reverse"
    zs: list[Tensor]  # the bias nodes' outputs z(l), when autograd records
    stats: Stats | None


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
        # The latent prior's terms: every node with a bias b(l) but a biased output node (its bias is
        # the constant c_y of the completeness identity), and every clamp (its clipped units' bounds).
        last = config.nodes[-1]
        self.bias_nodes = [n.name for n in config.nodes if n.op.has_prior() and not (n is last and n.op.has_bias())]
        self._bias = frozenset(self.bias_nodes)
        # The layers whose units have statistics (unit_stats): the prior terms that own a bias.
        self.unit_nodes = [n.name for n in config.nodes if n.name in self._bias and n.op.has_bias()]
        self._last_use = _last_uses(config.nodes)
        self._stats_at = _stats_sites(config.nodes, self.unit_nodes)
        self._head = _head_index(config.nodes)
        head_input = config.nodes[self._head].inputs[0]
        self._feature_dims = tuple(range(2, 1 + len(self.shapes[head_input])))  # a conv head's positions, averaged
        self._index = {n.name: k for k, n in enumerate(config.nodes)}
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

    def node_params(self, name: str) -> dict[str, Tensor]:
        """The tensors of node ``name`` by param name (weight, bias, scale, shift); {} for none."""
        key = _key(name)
        if key not in self.params:
            return {}
        return dict(self.params[key].named_parameters())

    # ------------------------------------------------------------------ input and head
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.config.input.shape

    @property
    def latent_names(self) -> list[str]:
        """The latent prior terms' names (bias nodes and clamps; module paths of a converted network), in graph order."""
        return list(self.bias_nodes)

    @property
    def output(self) -> Node:
        """The last node: its output is the logits."""
        return self.config.nodes[-1]

    @property
    def classifier(self) -> Node:
        """The linear classifier, logits = W f + b on the penultimate features f: the output node when
        it is linear. ValueError when the logits come from another head, which has no such W and b."""
        node, head = self.output, self.config.nodes[self._head]
        if node.op.type != "linear":
            raise ValueError(f"this network's logits come from node {head.name!r} ({head.op.type}) and the ops after it "
                             f"up to {node.name!r} ({node.op.type}), not from a linear classifier on its penultimate "
                             f"features, so they are no W f + b (which ViM needs)")
        return node

    def head(self) -> Head:
        """The classifier the detectors are fitted for: the class count and the final linear layer's
        weight and bias (float64, on the CPU; a zero bias where it has none). A network whose logits
        come from another head (SqueezeNet's conv head) has no weight and bias: the class count alone."""
        if self.output.op.type != "linear":
            return Head(len(self.config.classes))
        p = self.node_params(self.classifier.name)
        weight = p["weight"].detach().double().cpu()
        bias = p["bias"].detach().double().cpu() if "bias" in p else torch.zeros(weight.shape[0], dtype=torch.float64)
        return Head(len(self.config.classes), weight, bias)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's tensors: the converted module's (float32, float64, bfloat16, float16)."""
        return next(iter(self.params.parameters()), self.mean).dtype

    def to_dtype(self, dtype: torch.dtype) -> NRM:
        """The network's tensors in ``dtype``; the preprocessing constants and log Z(y) in float32 or wider
        (in bfloat16 a mean of 0.485 would round to 0.484375, moving every pixel). Returns self."""
        self.to(torch.promote_types(dtype, torch.float32))
        self.params.to(dtype)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 pixels, (N, H, W) or (N, H, W, C), to normalised (N, C, H, W) in the model's dtype and on its
        device (normalised in float32 or wider, then cast)."""
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
        return ((x - self.mean) / self.std).to(self.dtype)

    def check_input(self, x: Tensor) -> None:
        """A ValueError unless x is (N, C, H, W) of the model's input shape."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"got input of shape {tuple(x.shape)}, expected (N, {', '.join(map(str, self.input_shape))})")

    # ------------------------------------------------------------------ bottom-up
    def forward(self, x: Tensor) -> Tensor:
        """Plain classifier: normalised images (N, C, H, W) -> logits (N, K)."""
        return self._bottom_up(x).logits

    def encode(self, x: Tensor) -> Latents:
        """Bottom-up pass that keeps the latent variables z* = {s*(l), t*(l)} and every node's output."""
        return self._bottom_up(x, "all").latents  # type: ignore[return-value]

    def forward_pass(self, x: Tensor, stats: bool = False) -> Pass:
        """Scoring's bottom-up pass alone (no rendering): logits, penultimate features and, with
        ``stats``, :meth:`unit_stats`; without autograd, in place where it may (:meth:`_bottom_up`)."""
        up = self._bottom_up(x, stats=stats)
        return Pass(up.logits, up.features, None, up.stats)

    def _bottom_up(self, x: Tensor, keep: Keep = "none", stats: bool = False) -> _BottomUp:
        """The one bottom-up loop over the graph. ``keep`` "all" keeps every node's output and latent
        (encode); "reverse" keeps only what :meth:`full_pass` reads (each op's ``reads()``: a ReLU's
        output, a max-pool's switches; the values as shape-only stand-ins); "none" keeps nothing.
        Without autograd and eager, ReLUs and adds write into an input that nothing later reads, as
        torch's in-place ops do (cheaper than a fresh output on a CPU, docs/benchmarks.md). When
        autograd records, the bias nodes' outputs z(l) are returned (the autograd renderer
        differentiates with respect to them); with ``stats``, :meth:`unit_stats` is read as each
        value is made."""
        overwrite = not (keep == "all" or torch.is_grad_enabled() or torch.compiler.is_compiling())
        caller = x.untyped_storage().data_ptr() if overwrite else 0  # never overwritten (dynamo: not traced)
        values: dict[str, Tensor] = {INPUT: x}
        latents: dict[str, Tensor] = {}
        shapes: dict[str, Tensor] = {INPUT: x}  # keep "reverse": a stand-in of each value (its shape, no memory)
        zs: list[Tensor] = []
        unit: dict[str, Stats] = {}
        for k, node in enumerate(self.config.nodes):
            xs = [values[i] for i in node.inputs]
            if k == self._head:  # (N, F) penultimate features; a conv head's input map averaged over positions
                feats = xs[0].mean(dim=self._feature_dims) if self._feature_dims else xs[0].flatten(1)
            out = values[node.name] = self._node(k, node, xs, keep, overwrite, caller, values, latents)
            if keep == "reverse":
                shapes[node.name] = out.new_empty(()).expand(out.shape)
                if node.op.reads() == "output":
                    latents[node.name] = out  # never overwritten later (_may_overwrite)
            if node.name in self._bias and not overwrite:
                zs.append(out)
            if stats and node.name in self._stats_at:
                unit[self._stats_at[node.name]] = scores.unit_stats(out, node.op.positive_part)
            if keep != "all":
                for name in self._last_use.get(k, ()):
                    del values[name]  # nothing later reads it
        logits = values[self.output.name]
        st = None
        if stats:  # in unit_nodes order, wherever each was read
            rates, means = zip(*(unit[n] for n in self.unit_nodes), strict=True)
            st = (torch.cat(rates, dim=1), torch.cat(means, dim=1))
        kept = {"all": Latents(logits, values, latents), "reverse": Latents(logits, shapes, latents)}.get(keep)
        return _BottomUp(logits, feats, kept, zs, st)

    def _node(self, k: int, node: Node, xs: list[Tensor], keep: Keep, overwrite: bool, caller: int,
              values: dict[str, Tensor], latents: dict[str, Tensor]) -> Tensor:
        """Node ``k``'s output from its inputs ``xs``: through its BatchNorm while training with one;
        with its latent (into ``latents``) where the pass keeps it; in place where it may."""
        p = self.node_params(node.name)
        norm = self.train_norm
        if norm is not None and node.name in norm:  # training with BatchNorm: its beta is the bias
            return norm(node.name, node.op.forward(xs, {"weight": p["weight"]}))
        if keep == "all" or (keep == "reverse" and node.op.reads() == "latent"):
            out, lat = node.op.encode(xs, p)
            if lat is not None:
                latents[node.name] = lat
            return out
        if overwrite and node.op.inplace and self._may_overwrite(k, node, values, caller, latents):
            return node.op.forward_(xs, p)
        return node.op.forward(xs, p)

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

    def unit_stats(self, zs: list[Tensor]) -> Stats:
        """Per-channel statistics of the bottom-up pass, over spatial positions p, for every unit node
        (a latent prior term that owns a bias, see ``unit_nodes``; a clamp's terms have none):

            gate rate  g_{l,c} = mean_p 1[z(l)_{c,p} > 0]       the ReLU latents s*(l), as on-rates
            act mean   a_{l,c} = mean_p max(z(l)_{c,p}, 0)      the positive part of the activation

        zs are the unit nodes' outputs z(l), (N, C, H, W) or (N, F). Returns two (N, sum_l C_l).
        The scoring passes read the same statistics during their bottom-up pass (``stats``)."""
        parts = [scores.unit_stats(z) for z in zs]
        return torch.cat([r for r, _ in parts], dim=1), torch.cat([m for _, m in parts], dim=1)

    # ------------------------------------------------------------------ top-down
    def render(self, x: Tensor, y: Tensor | None = None, create_graph: bool = False) -> Rendering:
        """Fast renderer: h(0) = d logit_y / dx and eta_l = b(l) . d logit_y / dz(l), in one backward
        pass. ``y`` defaults to y* = argmax; ``create_graph`` lets training differentiate through it."""
        return self.autograd_pass(x, y, create_graph).rendering  # type: ignore[return-value]

    def autograd_pass(self, x: Tensor, y: Tensor | None = None, create_graph: bool = False,
                      stats: bool = False) -> Pass:
        """The bottom-up pass and one vector-Jacobian product of logit_y with respect to x and every
        bias node's output: h(0) = d logit_y / dx and eta_{l,c} = b_c(l) sum_p d logit_y / dz(l)_{c,p}.
        ``y`` defaults to y* = argmax. Always eager: inductor's CPU backward of these graphs measured
        slower than autograd's (docs/benchmarks.md section 1b)."""
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            up = self._bottom_up(x, stats=stats)
            if y is None:
                y = up.logits.detach().argmax(1)
            picked = up.logits.gather(1, y[:, None]).sum()
            grads = torch.autograd.grad(picked, [x, *up.zs], create_graph=create_graph)
        eta = [self.config.nodes[self._index[n]].op.prior(g, self.node_params(n), z)  # (N, C_l)
               for n, g, z in zip(self.bias_nodes, grads[1:], up.zs, strict=True)]
        return Pass(up.logits, up.features, self._rendering(y, grads[0], eta), up.stats)

    def render_explicit(self, lat: Latents, y: Tensor | None = None) -> Rendering:
        """Eq. (1) literally, generalised to a graph: start from the class template at the classifier
        and walk the nodes in reverse, each op's adjoint at the latents of the forward pass (conv:
        every position draws its template W^T h and the templates are placed and summed; relu: the
        gate s*(l); max-pool: each value to its switch t*(l); add: h to every input; concat: split;
        pad: crop; slice: scatter back; average pool: spread evenly). A node read by several others
        sums what they send it. eta_l = sum over channels and positions of b(l) . h at node l's output.
        """
        return self._walk(lat, lat.logits.argmax(1) if y is None else y, reverse=False)

    @torch.no_grad()
    def full_pass(self, x: Tensor, stats: bool = False, channels_last: bool = False) -> Pass:
        """Scoring's full pass with no autograd: the bottom-up pass (in place where it may), keeping
        only what the adjoints read (each ReLU's output, each max-pool's switches), then the top-down
        walk of eq. (1) from y* = argmax with ReLU gradients and the sums at forks written in place.
        The same numbers as :meth:`autograd_pass` (tests: random graphs, float64), at less memory
        traffic. ``channels_last``: the memory format of x, which the walk's gradients keep."""
        up = self._bottom_up(x, "reverse", stats)
        assert up.latents is not None
        return Pass(up.logits, up.features, self._walk(up.latents, up.logits.argmax(1), True, channels_last), up.stats)

    def _walk(self, lat: Latents, y: Tensor, reverse: bool, channels_last: bool = False) -> Rendering:
        """The top-down walk of :meth:`render_explicit`. ``reverse`` (:meth:`full_pass`, on what
        ``_bottom_up(keep="reverse")`` kept): each op's ``adjoint_``, and, eager, a gradient that nothing
        else holds is written into (a ReLU's gate applied, a second consumer's part added) instead of
        copied; traced by torch.compile, every step makes a new value and inductor plans the memory."""
        in_place = reverse and not torch.compiler.is_compiling()
        h: dict[str, Tensor] = {self.output.name: F.one_hot(y, len(self.config.classes)).to(lat.logits.dtype)}
        eta: dict[str, Tensor] = {}  # per-channel terms (N, C_l); eta_l is their sum
        for node in reversed(self.config.nodes):
            g = h.pop(node.name, None)
            if g is None:  # nothing downstream depends on this node
                continue
            p = self.node_params(node.name)
            xs, saved = [lat.values[i] for i in node.inputs], lat.latents.get(node.name)
            if node.name in self._bias:
                eta[node.name] = node.op.prior(g, p, saved)
            if reverse:
                parts = node.op.adjoint_(g, xs, p, saved, own=in_place and _holders(g, h) == 0)
            else:
                parts = node.op.adjoint(g, xs, p, saved)
            for name, part in zip(node.inputs, parts, strict=True):
                if channels_last and part.dim() == 4:  # as the forward's values (an average pool's adjoint: NCHW)
                    part = part.contiguous(memory_format=torch.channels_last)
                _send(h, name, part, in_place)
        per_channel = [eta.get(n, lat.logits.new_zeros(len(y), self.shapes[n][0])) for n in self.bias_nodes]
        return self._rendering(y, h[INPUT], per_channel)

    def _rendering(self, y: Tensor, h0: Tensor, per_channel: list[Tensor]) -> Rendering:
        if not per_channel:  # no bias node: eta is zero
            zero = h0.new_zeros(len(y), 0)
            return Rendering(y, h0, zero, zero)
        return Rendering(y, h0, torch.stack([e.sum(1) for e in per_channel], dim=1), torch.cat(per_channel, dim=1))

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
        """Per-sample score columns of normalised x (N, C, H, W), eager, in strict float32 (a
        nrm.runner.Runner scores with a precision, a memory layout and torch.compile): by default every
        column of ``self.columns`` plus the detector inputs the passes made; given ``columns``,
        exactly those, computed with only what they need (no backward pass unless one of them, or its
        detector, reads the top-down pass). ``unit_stats`` adds ``latent_gates`` / ``unit_acts`` (see
        :meth:`unit_stats`); by default they are made only when a fitted detector reads them (they
        cost a pass over every activation)."""
        self.check_input(x)
        plan = self.plan(columns, ("latent_gates", "unit_acts") if unit_stats else (), flag=False)
        with precision.autocast("fp32", self.mean.device.type):
            p = self.full_pass(x, plan.unit_stats) if plan.render else self.forward_pass(x, plan.unit_stats)
        return self.tabulate(x, p, plan)

    def tabulate(self, x: Tensor, p: Pass, plan: ScorePlan) -> dict[str, Tensor]:
        """The score dict of ``plan`` (exactly ``plan.outputs``, float32 columns; pred int64) from the
        pass ``p`` over normalised x: the classifier's columns, the rendered ones, the detector inputs
        and the fitted detectors' columns."""
        logits = p.logits.detach().float()
        out = scores.classifier_scores(logits)
        if p.rendering is not None:
            out.update(self._rendered_scores(x, p.rendering))
        if p.stats is not None:
            out["latent_gates"], out["unit_acts"] = (v.detach().float() for v in p.stats)
        out["penultimate"], out["logits"] = p.features.detach().float(), logits
        det = self.config.fitted.detector
        if det is not None:
            out.update(det.score(out, set(plan.columns)))  # the fitted detectors' columns (nrm.detectors)
        return {c: out[c] for c in plan.outputs}

    def _rendered_scores(self, x: Tensor, r: Rendering) -> dict[str, Tensor]:
        """The columns of the top-down pass: eta per layer and in all, the latent log-likelihood,
        the reconstruction error and the bound, and (internal) eta per channel for the detectors."""
        fitted = self.config.fitted
        eta_layers = r.eta_layers.detach().float()
        out = {"latent_prior_layers": eta_layers, "latent_prior": scores.latent_prior(eta_layers)}
        out["latent_loglik"] = scores.latent_loglik(out["latent_prior"], r.y, self.log_partition)
        out["recon_sq_error"] = scores.recon_sq_error(x.detach().float(), r.h0.detach().float())
        out["loglik_bound"] = scores.loglik_bound(out["recon_sq_error"], out["latent_loglik"], fitted.sigma2)
        out["latent_prior_channels"] = r.eta_channels.detach().float()  # type: ignore[union-attr]
        return out

    def extra_repr(self) -> str:
        return f"input={self.input_shape}, classes={len(self.config.classes)}, latent_layers={self.latent_names}"


def _last_uses(nodes: list[Node]) -> dict[int, list[str]]:
    """node index -> values no later node reads (the bottom-up pass drops them there)."""
    last: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for i in n.inputs:
            last[i] = k
    frees: dict[int, list[str]] = {}
    for name, k in last.items():
        frees.setdefault(k, []).append(name)
    return frees


def _stats_sites(nodes: list[Node], bias_nodes: list[str]) -> dict[str, str]:
    """node -> the bias node whose unit statistics are read from its output: a ReLU that reads
    the bias node (its output is max(z, 0) already: no second positive part), else the bias node."""
    at = {b: b for b in bias_nodes}
    for n in nodes:
        if n.op.positive_part and len(n.inputs) == 1 and at.get(n.inputs[0]) == n.inputs[0]:
            del at[n.inputs[0]]
            at[n.name] = n.inputs[0]
    return at


def _head_index(nodes: list[Node]) -> int:
    """The index of the head: the node whose input is the penultimate features. The output node when
    it is linear; else the last conv or linear before it on a path of one-input, parameter-free ops
    (SqueezeNet: conv 1x1, ReLU, global average pool, flatten); else the output node."""
    index = {n.name: k for k, n in enumerate(nodes)}
    k = len(nodes) - 1
    while not nodes[k].op.params() and len(nodes[k].inputs) == 1 and nodes[k].inputs[0] in index:
        k = index[nodes[k].inputs[0]]
    return k if "weight" in nodes[k].op.params() else len(nodes) - 1


def _send(h: dict[str, Tensor], name: str, part: Tensor, in_place: bool) -> None:
    """Add the gradient ``part`` a consumer sends node ``name`` to what ``h`` holds for it: into the
    held tensor when the walk may write in place, nothing else holds it and the dtypes allow."""
    if name not in h:
        h[name] = part
    elif in_place and _holders(h[name], h) == 1 and h[name].dtype == torch.result_type(h[name], part):
        h[name].add_(part)
    else:
        h[name] = h[name] + part


def _holders(t: Tensor, h: dict[str, Tensor]) -> int:
    """How many of the pending gradients ``h`` share ``t``'s memory (an add sends one to each input)."""
    ptr = t.untyped_storage().data_ptr()
    return sum(v.untyped_storage().data_ptr() == ptr for v in h.values())
