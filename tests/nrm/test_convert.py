"""nrm.from_torch: a user's piecewise-linear torch module (traced with torch.fx) becomes an NRM
graph with the same logits, BatchNorm folded where it can be and an affine node where it cannot;
h(0) is the original module's own input gradient and completeness holds. Anything not
piecewise-linear is refused with one sentence naming the op, the module path and why."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from support import autograd_of
from torch import nn

import nrm
from nrm.convert import ConversionError
from nrm.ops import Affine, AvgPool, Conv, Flatten, GlobalAvgPool, LeakyReLU, Linear, MaxPool, ReLU

RESNETS = Path("/work/shared/models/cifar10-resnet")
REL = 1e-5


def _bn(channels: int, seed: int, cls: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """An eval-mode BatchNorm with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    bn = cls(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 0.5)  # type: ignore[operator]
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)  # type: ignore[operator]
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)  # type: ignore[operator]
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.3)  # type: ignore[operator]
    return bn.eval()


def randomise_bn(net: nn.Module, seed: int) -> nn.Module:
    """Every BatchNorm of ``net`` given random running statistics and affine parameters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)  # type: ignore[union-attr]
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)  # type: ignore[union-attr]
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return net.eval()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    """|actual - expected| <= rel * max|expected| elementwise (relative to the tensor's scale)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def check_conversion(net: nn.Module, model: nrm.NRM, x: torch.Tensor, tmp_path: Path) -> None:
    """Logits equal the module's; save + load gives identical logits; in float64 h(0) equals the
    module's autograd input gradient and completeness holds; all to 1e-5 relative."""
    with torch.no_grad():
        assert_rel(model(x), net(x), rel=1e-4)  # float32 here; float64 below
    nrm.save(model, tmp_path / "ckpt")
    loaded = nrm.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    net64, model64, x64 = net.double(), model.double(), x.double()
    with torch.no_grad():
        assert_rel(model64(x64), net64(x64))
    r = model64.render(x64)
    grad, logit, _ = autograd_of(net64, x64, r.y)
    assert_rel(r.h0, grad)
    c = model64.node_params(model64.classifier.name)["bias"].detach()[r.y]
    assert_rel((r.h0 * x64).flatten(1).sum(1) + r.eta_layers.sum(1) + c, logit)
    net.float()


# --------------------------------------------------------------------------- small sequential nets


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


def test_sequential_becomes_a_chain_of_ops() -> None:
    model = nrm.from_torch(reference_net(), (3, 12, 12), classes=["a", "b", "c", "d"], mean=(0.1, 0.2, 0.3),
                           std=(1.0, 2.0, 3.0))
    assert [n.op for n in model.config.nodes] == [
        Conv(3, 6, 3, 1, 1), ReLU(), MaxPool(2, 2), Conv(6, 8, 3, 1, 0, bias_=False), LeakyReLU(0.2),
        GlobalAvgPool(), Flatten(), Linear(8, 4)]
    assert [n.name for n in model.config.nodes][0] == "0" and model.classifier.name == "9"  # module paths
    assert model.config.classes == ["a", "b", "c", "d"]
    assert model.config.input.mean == (0.1, 0.2, 0.3) and model.config.input.std == (1.0, 2.0, 3.0)
    # the BN shift lands in conv 0's bias b(l); the bias-free conv 4 is no latent prior term
    assert model.latent_names == ["0"]
    assert model.node_params("0")["bias"].abs().sum() > 0


def test_sequential_logits_h0_and_completeness(tmp_path: Path) -> None:
    torch.manual_seed(5)
    check_conversion(reference_net(), nrm.from_torch(reference_net(), (3, 12, 12)), torch.randn(5, 3, 12, 12),
                     tmp_path)


def test_batchnorm_without_affine_after_biasless_conv() -> None:
    bn = nn.BatchNorm2d(3, affine=False, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))  # type: ignore[union-attr]
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.5]))  # type: ignore[union-attr]
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, bias=False), bn.eval(), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 3 * 3, 2)).eval()
    model = nrm.from_torch(net, (1, 7, 7))
    expected_bias = -torch.tensor([0.5, -1.0, 2.0]) / torch.sqrt(torch.tensor([0.25, 4.0, 1.5]) + 1e-3)
    torch.testing.assert_close(model.node_params("0")["bias"].detach(), expected_bias)


def test_batchnorm_after_relu_becomes_an_affine_node(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), _bn(2, seed=4), nn.Flatten(), nn.Linear(72, 2)).eval()
    model = nrm.from_torch(net, (1, 8, 8))
    assert [n.name for n in model.config.nodes if isinstance(n.op, Affine)] == ["2"]
    assert model.latent_names == ["0", "2"]  # its shift is a latent prior term
    check_conversion(net, model, torch.randn(4, 1, 8, 8), tmp_path)


def test_training_mode_is_refused() -> None:
    with pytest.raises(ConversionError, match="training mode"):
        nrm.from_torch(reference_net().train(), (3, 12, 12))


@pytest.mark.parametrize("module", [
    nn.Conv2d(2, 4, 3, dilation=2, groups=2, padding=1),
    nn.Conv2d(2, 4, (3, 1), stride=(2, 1)),
    nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
    nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    nn.AdaptiveAvgPool2d(2),
], ids=["grouped-dilated", "non-square-strided", "maxpool-pad-dilation-ceil", "avgpool-pad-ceil", "adaptive-2"])
def test_formerly_refused_configurations_convert(module: nn.Module, tmp_path: Path) -> None:
    torch.manual_seed(6)
    body = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), module).eval()
    features = body(torch.zeros(1, 1, 10, 10)).numel()
    net = nn.Sequential(body, nn.Flatten(), nn.Linear(features, 3)).eval()
    check_conversion(net, nrm.from_torch(net, (1, 10, 10)), torch.randn(3, 1, 10, 10), tmp_path)


def test_padding_same_string_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(128, 2)).eval()
    with pytest.raises(ConversionError, match=r"^0: Conv2d with padding 'same'.*not supported"):
        nrm.from_torch(net, (1, 8, 8))


def test_the_output_must_be_logits() -> None:
    with pytest.raises(ConversionError, match=r"the output is not the logits, one \(N, K\) tensor \(got shape \(3, 2, 6, 6\)"):
        nrm.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval(), (1, 8, 8))


# --------------------------------------------------------------------------- refusals


class _Wrap(nn.Module):
    """A net with ``act`` inside ``layer3.0``: conv, act, flatten, linear."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.layer3 = nn.Sequential(nn.Sequential())
        self.layer3[0].add_module("conv", nn.Conv2d(1, 2, 3))
        self.layer3[0].add_module("act", act)
        self.fc = nn.Linear(72, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer3(x).flatten(1))


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Sigmoid()], ids=["GELU", "SiLU", "Sigmoid"])
def test_smooth_activation_is_refused(act: nn.Module) -> None:
    with pytest.raises(ConversionError, match=rf"^layer3\.0\.act: {type(act).__name__} is not piecewise-linear"):
        nrm.from_torch(_Wrap(act).eval(), (1, 8, 8))


def test_unsupported_module_is_refused() -> None:
    with pytest.raises(ConversionError, match=r"^layer3\.0\.act: PReLU is not supported"):
        nrm.from_torch(_Wrap(nn.PReLU()).eval(), (1, 8, 8))


class _SoftmaxInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), _Softmax())
        self.fc = nn.Linear(72, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class _Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=1)


def test_functional_softmax_is_refused() -> None:
    with pytest.raises(ConversionError, match=r"^body\.1: softmax is not piecewise-linear"):
        nrm.from_torch(_SoftmaxInside().eval(), (1, 8, 8))


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


def test_control_flow_on_tensor_values_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), _Branchy(), nn.Flatten(), nn.Linear(72, 2)).eval()
    with pytest.raises(ConversionError, match=r"control flow on tensor values.*one fixed piecewise-linear graph"):
        nrm.from_torch(net, (1, 8, 8))


def test_control_flow_refusal_names_the_submodule() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), _Branchy(), nn.Flatten(), nn.Linear(72, 2)).eval()
    with pytest.raises(ConversionError, match=r"^1: control flow on tensor values"):
        nrm.from_torch(net, (1, 8, 8))


# --------------------------------------------------------------------------- the shared CIFAR ResNets


def _shared_resnet(depth: int) -> nn.Module:
    path, weights = RESNETS / "resnet.py", RESNETS / f"resnet{depth}.safetensors"
    if not path.is_file() or not weights.is_file():
        pytest.skip(f"shared model {weights} not found (see /work/shared/models/cifar10-resnet/README.md)")
    spec = importlib.util.spec_from_file_location(f"_shared_resnet_{depth}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = getattr(module, f"resnet{depth}")()
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("depth", [20, 56])
def test_shared_cifar_resnet(depth: int, tmp_path: Path) -> None:
    net = _shared_resnet(depth)
    model = nrm.from_torch(net, (3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert model.classifier.name == "linear" and "layer1.0.conv1" in model.latent_names
    assert any(n.op.type == "slice" for n in model.config.nodes)  # option-A shortcuts
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(depth))
    check_conversion(net, model, x, tmp_path)


# --------------------------------------------------------------------------- torchvision-style ResNet-18


class BasicBlock(nn.Module):
    """torchvision's: one in-place ReLU module called twice (``shared_relu``), or two of them."""

    def __init__(self, cin: int, cout: int, stride: int, shared_relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.relu2 = self.relu if shared_relu else nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu2(out)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout at a reduced width (``w`` channels in the first stage)."""

    def __init__(self, w: int = 8, classes: int = 5, shared_relu: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths, cin = [w, 2 * w, 4 * w, 8 * w], w
        for k, c in enumerate(widths, start=1):
            stride = 1 if k == 1 else 2
            setattr(self, f"layer{k}", nn.Sequential(BasicBlock(cin, c, stride, shared_relu),
                                                     BasicBlock(c, c, 1, shared_relu)))
            cin = c
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _check_resnet18(size: int, n: int, shared_relu: bool, tmp_path: Path) -> None:
    torch.manual_seed(size)
    net = randomise_bn(ResNet18(shared_relu=shared_relu), size)
    model = nrm.from_torch(net, (3, size, size))
    assert {"layer2.0.downsample.0", "layer1.0.conv1", "conv1"} <= set(model.latent_names)
    assert not any(isinstance(nd.op, Affine) for nd in model.config.nodes)  # every BN folded
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))
    cols = model.score(x)
    assert cols["latent_prior"].shape == (n,) and torch.isfinite(cols["latent_prior"]).all()
    check_conversion(net, model, x, tmp_path)


@pytest.mark.parametrize("shared_relu", [True, False])
def test_resnet18_at_32(shared_relu: bool, tmp_path: Path) -> None:
    _check_resnet18(32, 3, shared_relu, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("shared_relu", [True, False])
def test_resnet18_at_224(shared_relu: bool, tmp_path: Path) -> None:
    _check_resnet18(224, 1, shared_relu, tmp_path)


# --------------------------------------------------------------------------- DenseNet-style concatenation


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 3, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 1, 1)
        c = 6
        self.block1 = nn.Sequential(DenseLayer(c, growth), DenseLayer(c + growth, growth))
        c += 2 * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 6, 1, bias=False),
                                        nn.AvgPool2d(2, 2))
        self.block2 = nn.Sequential(DenseLayer(6, growth))
        self.norm = nn.BatchNorm2d(6 + growth)
        self.fc = nn.Linear(6 + growth, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _CatPair(nn.Module):
    def __init__(self, as_tuple: bool):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(4, 2)
        self.as_tuple = as_tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        y = torch.cat((y, y) if self.as_tuple else [y, y], 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("as_tuple", [False, True], ids=["list", "tuple"])
def test_cat_of_a_list_or_tuple_converts(as_tuple: bool) -> None:
    model = nrm.from_torch(_CatPair(as_tuple).eval(), (1, 6, 6))
    assert any(n.op.type == "concat" for n in model.config.nodes)


def test_densenet_concatenation(tmp_path: Path) -> None:
    torch.manual_seed(7)
    net = randomise_bn(DenseNet(), 7)
    model = nrm.from_torch(net, (3, 8, 8))
    ops = {n.op.type for n in model.config.nodes}
    assert {"concat", "avgpool", "affine"} <= ops
    affines = [n.name for n in model.config.nodes if isinstance(n.op, Affine)]
    assert "block1.1.norm" in affines  # a BN reading a concat cannot be folded
    assert set(affines) <= set(model.latent_names)  # each shift is a latent prior term
    assert any(isinstance(n.op, AvgPool) for n in model.config.nodes)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert model.score(x)["latent_prior"].shape == (3,)
    check_conversion(net, model, x, tmp_path)
