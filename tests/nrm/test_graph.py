"""The two renderers on random graphs (nrm.graph), in float64.

A seeded generator builds graphs of every op: plain conv blocks (grouped, dilated, non-square,
strided, with or without bias), residual adds, concatenating branches, option-A slice + pad
shortcuts, average pools (padding, ceil_mode, count_include_pad), max-pools (padding, ceil_mode,
dilation), leaky ReLUs, affine nodes and reshapes. On each:

- ``render_explicit(encode(x))`` (each op's adjoint, walked backwards) equals ``render(x)`` (one
  vector-Jacobian product) in h(0), eta per layer and eta per channel;
- h(0) equals d logit_y / dx taken with torch.autograd on the plain forward pass;
- completeness: logit_y = <h(0), x> + sum_l eta_l + c_y, c_y the classifier's bias.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import nrm
from nrm.config import InputSpec, ModelConfig
from nrm.graph import INPUT, GraphError, Node, chain, infer_shapes
from nrm.model import Pass
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
    OpError,
    Pad,
    ReLU,
    Reshape,
    Shape,
    Slice,
    out_shape,
)
from nrm.runner import Runner

TOL = {"atol": 1e-9, "rtol": 1e-9}
SEEDS = range(12)


class _Builder:
    """Appends nodes and tracks each one's per-sample shape; a block that does not fit is dropped."""

    def __init__(self, shape: Shape):
        self.nodes: list[Node] = []
        self.shapes: dict[str, Shape] = {INPUT: shape}

    def add(self, op: Op, *inputs: str) -> str:
        name = f"n{len(self.nodes)}.{op.type}"
        self.shapes[name] = out_shape(op, [self.shapes[i] for i in inputs])  # OpError: does not fit
        self.nodes.append(Node(name, op, inputs))
        return name

    def block(self, build, x: str) -> str:  # type: ignore[no-untyped-def]
        """Run ``build(x)``; on OpError (a map too small for it) forget its nodes and keep x."""
        mark = len(self.nodes)
        try:
            return build(x)  # type: ignore[no-any-return]
        except OpError:
            for node in self.nodes[mark:]:
                del self.shapes[node.name]
            del self.nodes[mark:]
            return x


def _act(rng: random.Random) -> Op:
    return ReLU() if rng.random() < 0.6 else LeakyReLU(rng.choice([0.05, 0.1, 0.25]))


def _conv(b: _Builder, rng: random.Random, x: str) -> str:
    c = b.shapes[x][0]
    groups = rng.choice([g for g in (1, 2, 3) if c % g == 0])
    out = groups * rng.randint(1, 3)
    op = Conv(c, out, (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(1, 2), rng.randint(1, 2)),
              (rng.randint(0, 1), rng.randint(0, 1)), (rng.randint(1, 2), 1), groups, rng.random() < 0.8)
    return b.add(_act(rng), b.add(op, x))


def _residual(b: _Builder, rng: random.Random, x: str) -> str:
    c = b.shapes[x][0]
    h = b.add(_act(rng), b.add(Conv(c, c, 3, 1, 1), x))
    h = b.add(Conv(c, c, (1, 3), 1, (0, 1)), h)
    return b.add(_act(rng), b.add(Add(), h, x))


def _concat(b: _Builder, rng: random.Random, x: str) -> str:
    c = b.shapes[x][0]
    left = b.add(ReLU(), b.add(Conv(c, 2, 1), x))
    right = b.add(ReLU(), b.add(Conv(c, 3, 3, 1, 1), x))
    return b.add(Affine(c + 5), b.add(Concat(0), left, right, x))  # a BN after a concat: affine


def _shortcut(b: _Builder, rng: random.Random, x: str) -> str:
    """Option A: conv with stride 2 beside x[:, :, ::2, ::2] zero-padded in channels."""
    c = b.shapes[x][0]
    out = c + 2
    h = b.add(_act(rng), b.add(Conv(c, out, 3, 2, 1), x))
    sub = b.add(Slice((0, 0, 0), (c, 10**6, 10**6), (1, 2, 2)), x)
    return b.add(ReLU(), b.add(Add(), h, b.add(Pad((0, 0, 0, 0, 1, 1)), sub)))


def _avgpool(b: _Builder, rng: random.Random, x: str) -> str:
    k = rng.randint(2, 3)
    return b.add(AvgPool(k, rng.randint(1, 2), rng.randint(0, k // 2), rng.random() < 0.5, rng.random() < 0.5), x)


def _maxpool(b: _Builder, rng: random.Random, x: str) -> str:
    k = rng.randint(2, 3)
    return b.add(MaxPool(k, rng.randint(1, 2), rng.randint(0, k // 2), rng.randint(1, 2), rng.random() < 0.5), x)


def _affine_reshape(b: _Builder, rng: random.Random, x: str) -> str:
    c, h, w = b.shapes[x]
    return b.add(Reshape((c, w, h)), b.add(Affine(c), x))


BLOCKS = (_conv, _residual, _concat, _shortcut, _avgpool, _maxpool, _affine_reshape)


def random_graph(seed: int) -> ModelConfig:
    """A seeded random graph: 3-6 blocks (every kind appears across the seeds), then a head."""
    rng = random.Random(seed)
    channels, size = rng.choice([1, 2, 3]), rng.randint(7, 11)
    b = _Builder((channels, size, size))
    x = b.add(ReLU(), b.add(Conv(channels, 3, 3, 1, 1), INPUT))
    kinds = [BLOCKS[seed % len(BLOCKS)]] + [rng.choice(BLOCKS) for _ in range(rng.randint(2, 5))]
    for kind in kinds:
        x = b.block(lambda v, kind=kind: kind(b, rng, v), x)  # type: ignore[misc]
    if rng.random() < 0.5:
        x = b.add(Flatten(), b.add(GlobalAvgPool(), x))
    else:
        x = b.add(Reshape((int(torch.tensor(b.shapes[x]).prod()),)), x)
    if rng.random() < 0.5:
        x = b.add(ReLU(), b.add(Linear(b.shapes[x][0], 4), x))
    classes = rng.randint(2, 4)
    nodes = [*b.nodes, Node("classifier", Linear(b.shapes[x][0], classes), (x,))]
    return ModelConfig(InputSpec(channels, size, size, (0.0,) * channels, (1.0,) * channels),
                       [f"c{k}" for k in range(classes)], nodes)


def double_model(cfg: ModelConfig, seed: int) -> nrm.NRM:
    """A float64 NRM with biases, scales and shifts large enough that gates and switches vary."""
    torch.manual_seed(seed)
    model = nrm.NRM(cfg).double().eval()
    with torch.no_grad():
        for node in cfg.nodes:
            p = model.node_params(node.name)
            for key in ("bias", "shift"):
                if key in p:
                    p[key].normal_(0.0, 0.3)
            if "scale" in p:
                p["scale"].uniform_(0.5, 1.5).mul_(torch.randint(0, 2, p["scale"].shape) * 2 - 1)
    return model


def _inputs(cfg: ModelConfig, seed: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, *cfg.input.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _autograd(model: nrm.NRM, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit_y / dx and logit_y, from the plain forward pass."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        picked = model(xg).gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(picked.sum(), xg)
    return grad, picked.detach()


def test_generator_covers_every_op() -> None:
    """The seeds below exercise every op type (else the tests say less than they claim)."""
    seen = {n.op.type for s in SEEDS for n in random_graph(s).nodes}
    assert seen == {"conv", "linear", "affine", "relu", "leaky_relu", "maxpool", "avgpool", "global_avgpool",
                    "flatten", "reshape", "add", "concat", "slice", "pad"}
    convs = [n.op for s in SEEDS for n in random_graph(s).nodes if isinstance(n.op, Conv)]
    assert any(c.groups > 1 for c in convs) and any(c.dilation != (1, 1) for c in convs)
    assert any(c.kernel[0] != c.kernel[1] for c in convs) and any(not c.bias_ for c in convs)
    pools = [n.op for s in SEEDS for n in random_graph(s).nodes if isinstance(n.op, MaxPool | AvgPool)]
    assert any(p.ceil_mode for p in pools) and any(p.padding != (0, 0) for p in pools)
    assert any(isinstance(p, MaxPool) and p.dilation != (1, 1) for p in pools)


@pytest.mark.parametrize("seed", SEEDS)
def test_explicit_renderer_equals_autograd_renderer(seed: int) -> None:
    cfg = random_graph(seed)
    model, x = double_model(cfg, seed), _inputs(cfg, seed)
    explicit, fast = model.render_explicit(model.encode(x)), model.render(x)
    assert torch.equal(explicit.y, fast.y)
    assert explicit.eta_layers.shape == (3, len(model.bias_nodes))
    torch.testing.assert_close(explicit.h0, fast.h0.detach(), **TOL)
    torch.testing.assert_close(explicit.eta_layers, fast.eta_layers.detach(), **TOL)
    torch.testing.assert_close(explicit.eta_channels, fast.eta_channels.detach(), **TOL)  # type: ignore[arg-type]
    grad, _ = _autograd(model, x, fast.y)
    torch.testing.assert_close(explicit.h0, grad, **TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_in_place_reverse_pass_equals_the_autograd_renderer(seed: int) -> None:
    # scoring's full pass (NRM.full_pass): forward in place, each op's adjoint_ walked back, gradients
    # written into where nothing else holds them; the same logits, rendering and statistics
    cfg = random_graph(seed)
    model, x = double_model(cfg, seed), _inputs(cfg, seed)
    _assert_same_pass(model.full_pass(x, stats=True), model.autograd_pass(x, stats=True), **TOL)


def _assert_same_pass(got: Pass, ref: Pass, **tol: float) -> None:
    """Two full passes (logits, rendering, features, (gate rates, act means)) agree: the same y*, and
    logits, h(0), eta per layer and per channel, features and statistics within ``tol``."""
    g, r = got.rendering, ref.rendering
    assert g is not None and r is not None and got.stats is not None and ref.stats is not None
    assert torch.equal(g.y, r.y)
    for a, b in [(got.logits, ref.logits), (g.h0, r.h0), (g.eta_layers, r.eta_layers),
                 (g.eta_channels, r.eta_channels), (got.features, ref.features), (got.stats[0], ref.stats[0]),
                 (got.stats[1], ref.stats[1])]:
        torch.testing.assert_close(a, b.detach(), **tol)


def _small(nodes: list[Node]) -> ModelConfig:
    """A graph of ``nodes`` on 2 x 4 x 4 inputs, three classes."""
    return ModelConfig(InputSpec(2, 4, 4, (0.0,) * 2, (1.0,) * 2), ["a", "b", "c"], nodes)


def _assert_reverse_equals_autograd(cfg: ModelConfig) -> None:
    model, x = double_model(cfg, 0), _inputs(cfg, 0, n=8)
    r, got = model.render(x), model.full_pass(x).rendering
    assert got is not None
    torch.testing.assert_close(got.h0, r.h0.detach(), **TOL)
    torch.testing.assert_close(got.eta_channels, r.eta_channels.detach(), **TOL)  # type: ignore[arg-type]


def _two_relus_into_an_add(extra: bool) -> ModelConfig:
    """u = relu(conv(x)), v = relu(conv(x)), s = u + v: the add sends one gradient to both ReLUs.
    With ``extra``, k = conv(u) (made before s) and out = s + k: u also gets k's part, while v still
    holds the add's gradient."""
    nodes = [Node("c1", Conv(2, 3, 3, 1, 1), (INPUT,)), Node("u", ReLU(), ("c1",)),
             Node("c2", Conv(2, 3, 3, 1, 1), (INPUT,)), Node("v", ReLU(), ("c2",))]
    if extra:
        nodes += [Node("k", Conv(3, 3, 3, 1, 1), ("u",)), Node("s", Add(), ("u", "v")), Node("o", Add(), ("s", "k"))]
    else:
        nodes += [Node("o", Add(), ("u", "v"))]
    return _small([*nodes, Node("f", Flatten(), ("o",)), Node("classifier", Linear(48, 3), ("f",))])


@pytest.mark.parametrize("extra", [False, True], ids=["a ReLU's gate on a shared gradient",
                                                      "a second part added into a shared gradient"])
def test_the_in_place_reverse_pass_never_writes_into_a_gradient_another_node_holds(extra: bool) -> None:
    _assert_reverse_equals_autograd(_two_relus_into_an_add(extra))


def test_the_in_place_forward_never_overwrites_a_relu_output_the_reverse_pass_reads() -> None:
    # r's last forward use is the add, which would write into its first input: r, whose positive
    # entries are the gates the reverse pass reads
    _assert_reverse_equals_autograd(_small([
        Node("a", Conv(2, 3, 3, 1, 1), (INPUT,)), Node("r", ReLU(), ("a",)), Node("b", Conv(2, 3, 3, 1, 1), (INPUT,)),
        Node("s", Add(), ("r", "b")), Node("f", Flatten(), ("s",)), Node("classifier", Linear(48, 3), ("f",))]))


def test_the_in_place_reverse_pass_keeps_the_gate_of_a_negative_leaky_slope() -> None:
    # with a negative slope the output is > 0 on both sides of zero, so the pass keeps the gate itself
    _assert_reverse_equals_autograd(_small([
        Node("a", Conv(2, 3, 3, 1, 1), (INPUT,)), Node("r", LeakyReLU(-0.3), ("a",)),
        Node("f", Flatten(), ("r",)), Node("classifier", Linear(48, 3), ("f",))]))


@pytest.mark.parametrize("seed", [3, 4, 5], ids=["slice", "avgpool", "maxpool"])
def test_the_in_place_reverse_pass_in_channels_last_equals_nchw(seed: int) -> None:
    # an average pool's adjoint makes an NCHW gradient, which the walk turns channels-last; a slice's
    # and a max-pool's make theirs in the incoming gradient's layout
    cfg = random_graph(seed)
    model, x = double_model(cfg, seed).float(), _inputs(cfg, seed).float()
    ref = model.full_pass(x).rendering
    runner = Runner(model, layout="channels_last")
    got = model.full_pass(runner.to_layout(x), channels_last=True).rendering
    assert ref is not None and got is not None and got.h0.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.h0, ref.h0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.eta_channels, ref.eta_channels, rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seed", "channels_last"), [(3, False), (4, True)],
                         ids=["concat, slice, pad, affine, leaky ReLU, reshape", "max-pool, average pool, slice, channels-last"])
def test_the_compiled_full_pass_equals_the_eager_one(seed: int, channels_last: bool) -> None:
    # Runner(compile=True) traces NRM.full_pass whole (forward with what the adjoints read, then the walk),
    # writing nothing in place: the same logits, rendering and statistics in one graph
    from torch._dynamo.utils import counters

    cfg = random_graph(seed)
    model, x = double_model(cfg, seed).float(), _inputs(cfg, seed).float()
    layout = "channels_last" if channels_last else "nchw"
    eager, compiled = Runner(model, layout=layout), Runner(model, layout=layout, compile=True)
    plan = model.plan(inputs=("latent_gates", "unit_acts"))  # the full table with the unit statistics
    ref = eager.passes(eager.to_layout(x), plan)
    counters.clear()
    got = compiled.passes(compiled.to_layout(x), plan)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # compiled, as one graph
    _assert_same_pass(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_completeness_on_random_graphs(seed: int) -> None:
    cfg = random_graph(seed)
    model, x = double_model(cfg, seed), _inputs(cfg, seed + 100)
    y = torch.tensor([0, 1, len(cfg.classes) - 1])  # from given classes, not only y*
    for r in (model.render(x, y), model.render_explicit(model.encode(x), y)):
        _, logit = _autograd(model, x, y)
        c = model.node_params("classifier")["bias"].detach()[y]
        rebuilt = (r.h0 * x).flatten(1).sum(1) + r.eta_layers.sum(1) + c
        torch.testing.assert_close(rebuilt.detach(), logit, **TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_forward_only_pass_equals_the_pass_that_keeps_every_value(seed: int) -> None:
    # with no backward pass, ReLUs and adds write into inputs that nothing later reads; slices of
    # live values, values read twice and the caller's input must come out as the kept pass has them
    cfg = random_graph(seed)
    model, x = double_model(cfg, seed), _inputs(cfg, seed)
    fast = model.score(x, columns=["max_logit"], unit_stats=True)
    lat = model.encode(x)
    rates, acts = model.unit_stats([lat.values[n] for n in model.bias_nodes])
    torch.testing.assert_close(fast["max_logit"], lat.logits.max(1).values.float(), atol=0, rtol=0)
    torch.testing.assert_close(fast["latent_gates"], rates.float(), atol=0, rtol=0)
    torch.testing.assert_close(fast["unit_acts"], acts.float(), atol=0, rtol=0)


def test_the_forward_only_pass_leaves_the_callers_input_unchanged() -> None:
    # the ReLU reads a view of the input (flatten): writing in place there would change the caller's tensor
    nodes = chain(Flatten(), ReLU(), ("classifier", Linear(12, 2)))
    model = nrm.NRM(ModelConfig(InputSpec(3, 2, 2, (0.0,) * 3, (1.0,) * 3), ["a", "b"], nodes))
    x = torch.randn(4, 3, 2, 2)
    before = x.clone()
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(x, before, atol=0, rtol=0)


@pytest.mark.parametrize("nodes", [
    # the ReLU and the add read the conv's output first, and the concat reads it afterwards
    [Node("a", Conv(2, 2, 3, 1, 1), (INPUT,)), Node("r", ReLU(), ("a",)), Node("s", Add(), ("a", "r")),
     Node("c", Concat(0), ("s", "a")), Node("f", Flatten(), ("c",)), Node("classifier", Linear(64, 2), ("f",))],
    # the ReLU reads a slice (a view) of the conv's output, which the concat reads afterwards
    [Node("a", Conv(2, 4, 3, 1, 1), (INPUT,)), Node("s", Slice((0, 0, 0), (2, 4, 4), (1, 1, 1)), ("a",)),
     Node("r", ReLU(), ("s",)), Node("c", Concat(0), ("r", "a")), Node("f", Flatten(), ("c",)),
     Node("classifier", Linear(96, 2), ("f",))],
], ids=["directly", "through a slice of it"])
def test_the_forward_only_pass_leaves_a_value_read_later_unchanged(nodes: list[Node]) -> None:
    model = nrm.NRM(ModelConfig(InputSpec(2, 4, 4, (0.0,) * 2, (1.0,) * 2), ["a", "b"], nodes))
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        fast = model(x)
    torch.testing.assert_close(fast, model.encode(x).logits, atol=0, rtol=0)


def test_the_forward_only_pass_in_bf16_adds_a_float32_shortcut_in_float32() -> None:
    # under autocast the conv gives bfloat16 and the padded input stays float32: their sum is float32
    nodes = [Node("a", Conv(2, 4, 3, 1, 1), (INPUT,)), Node("p", Pad((0, 0, 0, 0, 1, 1)), (INPUT,)),
             Node("s", Add(), ("a", "p")), Node("f", Flatten(), ("s",)), Node("classifier", Linear(64, 2), ("f",))]
    model = nrm.NRM(ModelConfig(InputSpec(2, 4, 4, (0.0,) * 2, (1.0,) * 2), ["a", "b"], nodes))
    runner = Runner(model, precision="bf16", layout=None)
    x = torch.randn(3, 2, 4, 4)
    feats = runner.score(x, model.plan([], ["penultimate"], flag=False))["penultimate"]  # the classifier's input: the sum
    with runner.autocast():
        kept = model.encode(x).values["f"]
    assert kept.dtype == torch.float32
    torch.testing.assert_close(feats, kept, atol=0, rtol=0)


def test_affine_shift_is_a_latent_prior_term() -> None:
    cfg = random_graph(2)  # seed 2 starts with the concat block and its affine node
    affines = [n.name for n in cfg.nodes if isinstance(n.op, Affine)]
    assert affines and set(affines) <= set(nrm.NRM(cfg).latent_names)


def test_maxpool_adjoint_never_routes_to_padding() -> None:
    """A padded max-pool of all-negative values: every window's switch is a real position."""
    op = MaxPool(3, 2, 1, 1, True)
    x = -torch.rand(1, 1, 5, 5, dtype=torch.float64) - 1
    _, switches = op.encode([x], {})
    h = torch.randn(1, 1, *switches.shape[-2:], dtype=torch.float64)
    (back,) = op.adjoint(h, [x], {}, switches)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((F.max_pool2d(xg, 3, 2, 1, 1, True) * h).sum(), xg)
    torch.testing.assert_close(back, grad, atol=0, rtol=0)
    assert back.sum().item() == pytest.approx(h.sum().item())


@pytest.mark.parametrize(("kernel", "size"), [((8, 8), (8, 8)), ((2, 2), (9, 9)), ((2, 3), (7, 8))],
                         ids=["one window (a ResNet's final pool)", "a floor-mode tail", "non-square"])
def test_the_adjoint_of_an_average_pool_whose_windows_tile_the_input_is_its_gradient(
        kernel: tuple[int, int], size: tuple[int, int]) -> None:
    # stride = kernel, no padding: each value spread over its own window, the tail no window reached zero
    op = AvgPool(kernel, kernel)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    out = op.forward([x], {})
    h = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * h).sum(), x)
    (back,) = op.adjoint(h, [x.detach()], {}, None)
    torch.testing.assert_close(back, grad, **TOL)


@pytest.mark.parametrize(("nodes", "match"), [
    ([Node("a", ReLU(), ("nowhere",)), Node("fc", Linear(4, 2), ("a",))], r"node 'a'.*\['nowhere'\].*not defined"),
    ([Node("a", Conv(2, 3, 1), (INPUT,)), Node("fc", Linear(3, 2), ("a",))], r"node 'a'.*C=2"),
    ([Node("a", Flatten(), (INPUT,)), Node("a", Flatten(), ("a",)), Node("fc", Linear(4, 2), ("a",))],
     r"node 'a': duplicate"),
    ([Node("a", Flatten(), (INPUT,)), Node("b", Flatten(), (INPUT,)), Node("fc", Linear(4, 2), ("a",))],
     r"\['b'\].*never used"),
    ([Node("a", Flatten(), (INPUT,)), Node("fc", Linear(4, 3), ("a",))], r"node 'fc'.*3 outputs.*2 classes"),
    ([Node("a", Add(), (INPUT,)), Node("fc", Linear(4, 2), ("a",))], r"node 'a'.*two or more"),
], ids=["undefined-input", "channels", "duplicate", "dead-node", "classes", "arity"])
def test_graph_errors_name_the_node(nodes: list[Node], match: str) -> None:
    with pytest.raises(GraphError, match=match):
        infer_shapes(nodes, (1, 2, 2), 2)
