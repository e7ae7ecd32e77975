"""nrm.from_torch: a pretrained nn.Sequential becomes an NRM with the same logits (BatchNorm folded),
that still satisfies completeness; unsupported modules are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nrm
from nrm.config import Conv, Flatten, GlobalAvgPool, LeakyReLU, Linear, MaxPool, ReLU


def _bn(channels: int, seed: int) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) * 2 + 0.3)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn


def reference_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        _bn(6, seed=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=1, padding=0, bias=False),
        nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8, 4),
    ).eval()


def test_logits_match_torch_module() -> None:
    net = reference_net()
    model = nrm.from_torch(net, (3, 12, 12), classes=["a", "b", "c", "d"], mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    assert model.config.layers == [
        Conv("conv1", 3, 6, 3, 1, 1), ReLU(), MaxPool(2, 2), Conv("conv2", 6, 8, 3, 1, 0), LeakyReLU(0.2),
        GlobalAvgPool(), Flatten(), Linear("linear1", 8, 4)]
    assert model.config.classes == ["a", "b", "c", "d"]
    assert model.config.input.mean == (0.1, 0.2, 0.3) and model.config.input.std == (1.0, 2.0, 3.0)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
    # the BN shift lands in the NRM's bias b(1), so eta_1 sees it
    assert model.layer("conv1").bias.abs().sum() > 0
    assert torch.equal(model.layer("conv2").bias, torch.zeros(8))  # bias=False becomes a zero bias


def test_converted_model_satisfies_completeness() -> None:
    model = nrm.from_torch(reference_net(), (3, 12, 12)).double()
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    r = model.render(x)
    logits = model(x).detach()
    rebuilt = (r.h0 * x).flatten(1).sum(1) + r.eta_layers.sum(1) + model.layer("linear1").bias.detach()[r.y]
    torch.testing.assert_close(rebuilt, logits.gather(1, r.y[:, None]).squeeze(1), atol=1e-9, rtol=1e-9)
    explicit = model.render_explicit(model.encode(x))
    torch.testing.assert_close(explicit.h0, r.h0, atol=1e-9, rtol=1e-9)


def test_nested_sequential_hidden_linear_and_overlapping_pool(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3), _bn(4, seed=2), nn.ReLU(), nn.MaxPool2d(3, stride=1)),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 7, bias=False),
        nn.ReLU(),
        nn.Linear(7, 2),
    ).eval()
    model = nrm.from_torch(net, (1, 8, 8))
    assert model.latent_names == ["conv1", "linear1"]
    assert model.config.layers[2] == MaxPool(3, 1)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
    # the converted model is an ordinary checkpoint
    nrm.save(model, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(nrm.load(tmp_path / "c")(x), net(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_without_affine_after_biasless_conv() -> None:
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3, affine=False, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.5]))
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, bias=False), bn.eval(), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 3 * 3, 2)).eval()
    model = nrm.from_torch(net, (1, 7, 7))
    x = torch.randn(5, 1, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
        expected_bias = -torch.tensor([0.5, -1.0, 2.0]) / torch.sqrt(torch.tensor([0.25, 4.0, 1.5]) + 1e-3)
        torch.testing.assert_close(model.layer("conv1").bias, expected_bias)


def test_batchnorm_in_training_mode_raises() -> None:
    net = reference_net().train()
    with pytest.raises(ValueError, match="training mode"):
        nrm.from_torch(net, (3, 12, 12))


def test_batchnorm_not_after_conv_raises() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 2)).eval()
    with pytest.raises(ValueError, match="BatchNorm2d must directly follow a Conv2d"):
        nrm.from_torch(net, (1, 8, 8))


@pytest.mark.parametrize(("module", "name"), [
    (nn.Sigmoid(), "Sigmoid"),
    (nn.AvgPool2d(2), "AvgPool2d"),
    (nn.Tanh(), "Tanh"),
    (nn.ReLU6(), "ReLU6"),
    (nn.GELU(), "GELU"),
])
def test_unsupported_module_is_named(module: nn.Module, name: str) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), module, nn.Flatten(), nn.Linear(1, 2)).eval()
    with pytest.raises(ValueError, match=rf"module #1 {name} .*not supported") as e:
        nrm.from_torch(net, (1, 8, 8))
    assert "supported: Conv2d" in str(e.value)


@pytest.mark.parametrize(("module", "match"), [
    (nn.Conv2d(1, 2, 3, groups=1, dilation=2), "dilation"),
    (nn.Conv2d(1, 2, (3, 1)), "not square"),
    (nn.Conv2d(1, 2, 3, padding="same"), "padding"),
    (nn.MaxPool2d(2, padding=1), "padding=0"),
    (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
    (nn.AdaptiveAvgPool2d(2), "AdaptiveAvgPool2d"),
])
def test_unsupported_configurations(module: nn.Module, match: str) -> None:
    net = nn.Sequential(module, nn.Flatten(), nn.Linear(1, 2)).eval()
    with pytest.raises(ValueError, match=match):
        nrm.from_torch(net, (1, 8, 8))


def test_must_end_with_linear() -> None:
    with pytest.raises(ValueError, match="end with an nn.Linear"):
        nrm.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval(), (1, 8, 8))


def test_non_sequential_module_is_refused() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    with pytest.raises(ValueError, match="Net"):
        nrm.from_torch(Net(), (1, 8, 8))
