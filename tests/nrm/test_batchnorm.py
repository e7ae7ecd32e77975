"""Training with BatchNorm put back (nrm.batchnorm, nrm.training.attach_batchnorm / fold_batchnorm):
it starts as the identity, folds back into the same function, folds in the clean batches'
statistics, and train(batchnorm=True) returns a plain NRM with the graph it was given."""

from __future__ import annotations

import pytest
import torch
from support import tiny_config
from test_train import quiet, two_halves

import nrm
from nrm.batchnorm import TrainNorm
from nrm.training import attach_batchnorm, fold_batchnorm


def _model(seed: int = 0) -> nrm.NRM:
    torch.manual_seed(seed)
    return nrm.NRM(tiny_config(channels=1, size=8, classes=3)).double()


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_an_attached_batchnorm_starts_as_the_identity_on_its_calibration_batch() -> None:
    model, x = _model(), _x()
    with torch.no_grad():
        before = model(x)
        attach_batchnorm(model, x)
        after = model.eval()(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_it_normalises_every_conv_and_linear_bias_node_but_the_classifier() -> None:
    model = _model()
    norm = attach_batchnorm(model, _x())
    assert norm.names == ["conv1", "conv2"]
    assert isinstance(model.train_norm, TrainNorm)


def test_folding_keeps_the_function_the_network_had_with_its_batchnorms() -> None:
    model, x = _model(), _x()
    norm = attach_batchnorm(model, x)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained state: any scales, shifts and statistics
        for t in [*norm.parameters(), *norm.buffers()]:
            t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
        with_norm = model.eval()(x)
        norm.fold({n: model.node_params(n) for n in norm.names})
        model.train_norm = None
        folded = model(x)
    torch.testing.assert_close(folded, with_norm, rtol=1e-10, atol=1e-10)


def test_fold_batchnorm_folds_in_the_statistics_of_the_clean_batches() -> None:
    # the first conv sees the input itself: after folding, its output over those batches has the
    # per-channel mean beta and the per-channel variance gamma^2 (up to BatchNorm's eps)
    model, x = _model(), _x(128)
    norm = attach_batchnorm(model, _x(64, seed=5))
    with torch.no_grad():
        norm.gamma["0"].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.beta["0"].copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    fold_batchnorm(model, iter([x[:64], x[64:]]))
    p = model.node_params("conv1")
    z = torch.nn.functional.conv2d(x, p["weight"], p["bias"], padding=1)  # (128, 4, 8, 8)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=z.dtype))
    torch.testing.assert_close(z.var((0, 2, 3), unbiased=False), torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=z.dtype),
                               rtol=1e-3, atol=1e-3)
    assert model.train_norm is None


def test_training_with_batchnorm_returns_the_same_graph_with_plain_parameters() -> None:
    images, labels = two_halves()
    cfg = nrm.TrainConfig(epochs=3, batch_size=32, recon_weight=0.0, seed=0, batchnorm=True)
    result = nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet)
    assert result.model.train_norm is None
    assert sorted(result.model.state_dict()) == sorted(nrm.NRM(result.model.config).state_dict())
    assert result.val_accuracy > 0.9


def test_training_with_batchnorm_refuses_the_reconstruction_term() -> None:
    images, labels = two_halves(32)
    cfg = nrm.TrainConfig(epochs=1, recon_weight=0.5, batchnorm=True)
    with pytest.raises(ValueError, match="BatchNorm needs recon_weight 0, got 0.5"):
        nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet)
