"""The two renderers of eq. (1) against each other, against autograd and against completeness.

On random ReLU / leaky-ReLU / max-pool CNNs (overlapping pooling windows included) and on every
preset, in float64:

- ``render_explicit(encode(x))`` (the literal top-down walk) equals ``render(x)`` (one VJP);
- h(0) equals d logit_y / dx taken here with torch.autograd on the plain forward pass;
- completeness: logit_y = <h(0), x> + sum_l eta_l + classifier bias[y], for y* and for a given y.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nrm
from nrm.config import InputSpec, ModelConfig, validate
from nrm.graph import chain
from nrm.ops import Conv, Flatten, GlobalAvgPool, LeakyReLU, Linear, MaxPool, Op, ReLU

TOL = {"atol": 1e-9, "rtol": 1e-9}
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- random architectures


@st.composite
def architectures(draw: st.DrawFn) -> ModelConfig:
    """1-3 conv blocks (conv, relu | leaky_relu, optional max-pool), then global average pool or
    not, flatten, an optional hidden linear + relu, and the linear classifier."""
    channels = draw(st.sampled_from([1, 3]))
    size = draw(st.integers(6, 12))
    layers: list[Op | tuple[str, Op]] = []
    c, h, w = channels, size, size
    for i in range(draw(st.integers(1, 3))):
        kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
        out = draw(st.integers(1, 5))
        layers.append((f"conv{i + 1}", Conv(c, out, kernel, stride, padding, bias_=draw(st.booleans()))))
        c = out
        h = (h + 2 * padding - kernel) // stride + 1
        w = (w + 2 * padding - kernel) // stride + 1
        assume(h >= 1 and w >= 1)  # the map went below 1x1: not an architecture
        if draw(st.booleans()):
            layers.append(ReLU())
        else:
            # width=32: slopes exact in float32; see test_leaky_gate_keeps_float64_slope for other slopes
            layers.append(LeakyReLU(draw(st.floats(0.015625, 0.5, width=32))))
        if draw(st.booleans()):
            pk, ps = draw(st.integers(2, 3)), draw(st.integers(1, 2))  # stride < kernel: overlapping windows
            layers.append(MaxPool(pk, ps))
            h = (h - pk) // ps + 1
            w = (w - pk) // ps + 1
            assume(h >= 1 and w >= 1)
    if draw(st.booleans()):
        layers.append(GlobalAvgPool())
        h = w = 1
    layers.append(Flatten())
    features = c * h * w
    if draw(st.booleans()):
        hidden = draw(st.integers(2, 6))
        layers += [("hidden", Linear(features, hidden)), ReLU()]
        features = hidden
    classes = draw(st.integers(2, 4))
    layers.append(("classifier", Linear(features, classes)))
    cfg = ModelConfig(InputSpec(channels, size, size, (0.0,) * channels, (1.0,) * channels),
                      [f"c{k}" for k in range(classes)], chain(*layers))
    validate(cfg)  # any rejection is a disagreement between this strategy and validate
    return cfg


def double_model(cfg: ModelConfig, seed: int) -> nrm.NRM:
    """An NRM in float64 with biases large enough that gates and switches vary across samples."""
    torch.manual_seed(seed)
    model = nrm.NRM(cfg).double().eval()
    with torch.no_grad():
        for node in cfg.nodes:
            if "bias" in (p := model.node_params(node.name)):
                p["bias"].normal_(0.0, 0.3)
    return model


def autograd_h0(model: nrm.NRM, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit_y / dx and logit_y, computed here from the plain forward pass."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        picked = logits.gather(1, y[:, None]).squeeze(1)  # (N,)
        (grad,) = torch.autograd.grad(picked.sum(), xg)
    return grad, picked.detach()


def classifier_bias(model: nrm.NRM) -> torch.Tensor:
    return model.node_params(model.classifier.name)["bias"].detach()


def check_renderers(model: nrm.NRM, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    lat = model.encode(x)
    explicit = model.render_explicit(lat, y)
    fast = model.render(x, y)
    y_used = lat.logits.argmax(1) if y is None else y
    assert torch.equal(explicit.y, y_used) and torch.equal(fast.y, y_used)
    assert explicit.h0.shape == x.shape == fast.h0.shape
    n_bias = len(model.bias_nodes)
    assert explicit.eta_layers.shape == fast.eta_layers.shape == (x.shape[0], n_bias)
    torch.testing.assert_close(explicit.h0.detach(), fast.h0.detach(), **TOL)
    torch.testing.assert_close(explicit.eta_layers.detach(), fast.eta_layers.detach(), **TOL)

    per_channel = [getattr(r, "eta_channels", None) for r in (explicit, fast)]
    if all(c is not None for c in per_channel):  # optional per-channel split: same in both, sums to eta_l
        torch.testing.assert_close(per_channel[0].detach(), per_channel[1].detach(), **TOL)
        torch.testing.assert_close(per_channel[1].sum(1).detach(), fast.eta_layers.sum(1).detach(), **TOL)

    grad, logit = autograd_h0(model, x, y_used)
    torch.testing.assert_close(fast.h0.detach(), grad, **TOL)
    torch.testing.assert_close(lat.logits.detach(), model(x).detach(), **TOL)

    # completeness: the piecewise-linear network is affine on x's region
    rebuilt = (fast.h0 * x).flatten(1).sum(1) + fast.eta_layers.sum(1) + classifier_bias(model)[y_used]
    torch.testing.assert_close(rebuilt.detach(), logit, **TOL)
    rebuilt_explicit = (explicit.h0 * x).flatten(1).sum(1) + explicit.eta_layers.sum(1) + classifier_bias(model)[y_used]
    torch.testing.assert_close(rebuilt_explicit.detach(), logit, **TOL)


# --------------------------------------------------------------------------- tests


@HYP
@given(cfg=architectures(), seed=st.integers(0, 2**16), n=st.integers(1, 4))
def test_renderers_agree_on_random_architectures(cfg: ModelConfig, seed: int, n: int) -> None:
    model = double_model(cfg, seed)
    x = torch.randn(n, *cfg.input.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    check_renderers(model, x)


@settings(HYP, max_examples=15)
@given(cfg=architectures(), seed=st.integers(0, 2**16), data=st.data())
def test_renderers_agree_from_a_given_class(cfg: ModelConfig, seed: int, data: st.DataObject) -> None:
    model = double_model(cfg, seed)
    n = 3
    x = torch.randn(n, *cfg.input.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ys = data.draw(st.lists(st.integers(0, len(cfg.classes) - 1), min_size=n, max_size=n))
    check_renderers(model, x, torch.tensor(ys))


def test_overlapping_maxpool_routes_to_every_switch() -> None:
    """A 3x3 / stride-1 max-pool whose windows share their maximum: the shared input position
    receives the sum of every window's top-down signal (scatter-add, not overwrite)."""
    layers = chain(("conv1", Conv(1, 1, 1, 1, 0)), ReLU(), MaxPool(3, 1), Flatten(), ("classifier", Linear(4, 2)))
    cfg = ModelConfig(InputSpec(1, 4, 4, (0.0,), (1.0,)), ["a", "b"], layers)
    model = nrm.NRM(cfg).double().eval()
    with torch.no_grad():
        model.node_params("conv1")["weight"].fill_(1.0)
        model.node_params("conv1")["bias"].zero_()
        model.node_params("classifier")["weight"].copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]))
        model.node_params("classifier")["bias"].zero_()
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 1] = 5.0  # inside all four 3x3 windows
    x[0, 0, 2, 2] = 4.0
    r = model.render_explicit(model.encode(x), torch.tensor([0]))
    expected = torch.zeros_like(x)
    expected[0, 0, 1, 1] = 1.0 + 2.0 + 3.0 + 4.0
    torch.testing.assert_close(r.h0, expected, atol=0, rtol=0)
    torch.testing.assert_close(model.render(x, torch.tensor([0])).h0, expected, atol=0, rtol=0)


def test_leaky_gate_keeps_float64_slope() -> None:
    layers = chain(("conv1", Conv(1, 2, 3, 1, 1)), ("act", LeakyReLU(0.1)), GlobalAvgPool(), Flatten(),
                   ("classifier", Linear(2, 2)))
    cfg = ModelConfig(InputSpec(1, 6, 6, (0.0,), (1.0,)), ["a", "b"], layers)
    model = double_model(cfg, seed=0)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = model.node_params("conv1")
    pre = torch.nn.functional.conv2d(x, p["weight"], p["bias"], padding=1)
    gate = model.encode(x).latents["act"]
    assert gate.dtype == torch.float64
    torch.testing.assert_close(gate, torch.where(pre > 0, 1.0, torch.tensor(0.1, dtype=torch.float64)), atol=0, rtol=0)
    fast, explicit = model.render(x), model.render_explicit(model.encode(x))
    torch.testing.assert_close(explicit.h0.detach(), fast.h0.detach(), **TOL)


@pytest.mark.parametrize("name", sorted(nrm.PRESETS))
def test_renderers_agree_on_every_preset(name: str) -> None:
    cfg = nrm.preset(name, width=0.25, classes=5)
    model = double_model(cfg, seed=1)
    x = torch.randn(2, *cfg.input.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    check_renderers(model, x)
    check_renderers(model, x, torch.tensor([4, 0]))
