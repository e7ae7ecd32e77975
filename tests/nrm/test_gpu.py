"""What only a GPU can show: the NRM scores on CUDA as on the CPU, in every precision and layout.

Every test here skips without CUDA; scripts/gpu_check.sh runs them on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch
from support import tiny_config

import nrm
from nrm.fit import fit
from nrm.runner import Runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


@pytest.fixture
def pair() -> tuple[nrm.NRM, nrm.NRM, torch.Tensor]:
    torch.manual_seed(0)
    cpu = nrm.NRM(nrm.preset("resnet-cifar", 0.5, depth=8)).eval().requires_grad_(False)
    x = torch.randn(64, 3, 32, 32)
    fit(cpu, [x], [x], detector="mahalanobis")
    gpu = nrm.NRM(cpu.config).eval().requires_grad_(False)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda(), x


def test_cuda_scores_equal_cpu_scores_in_fp32(pair: tuple[nrm.NRM, nrm.NRM, torch.Tensor]) -> None:
    cpu, gpu, x = pair
    a, b = cpu.score(x), gpu.score(x.cuda())
    for k in ("max_logit", "latent_prior", "recon_sq_error", "det_mahalanobis"):
        torch.testing.assert_close(b[k].cpu(), a[k], rtol=1e-3, atol=1e-3 * float(a[k].abs().max()))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32"])
def test_reduced_precision_keeps_the_prediction_of_most_rows(pair: tuple[nrm.NRM, nrm.NRM, torch.Tensor],
                                                             precision: str) -> None:
    cpu, gpu, x = pair
    ref = cpu.score(x)["pred"]
    got = Runner(gpu, precision=precision).score(x.cuda())
    assert (got["pred"].cpu() == ref).float().mean() >= 0.9
    assert torch.isfinite(got["latent_prior"]).all()


def test_channels_last_on_cuda_changes_no_score(pair: tuple[nrm.NRM, nrm.NRM, torch.Tensor]) -> None:
    _, gpu, x = pair
    a = gpu.score(x.cuda())
    b = Runner(gpu, layout="channels_last").score(x.cuda())
    torch.testing.assert_close(b["latent_prior"], a["latent_prior"], rtol=1e-4, atol=1e-4)


def test_a_checkpoint_loads_onto_the_gpu(tmp_path: object) -> None:
    torch.manual_seed(0)
    model = nrm.NRM(tiny_config()).eval()
    path = tmp_path / "ckpt"  # type: ignore[operator]
    nrm.save(model, path)
    loaded = nrm.load(path, device="cuda")
    assert loaded.mean.device.type == "cuda" and loaded.score(torch.randn(4, 1, 8, 8, device="cuda"))["pred"].is_cuda


@pytest.mark.parametrize(("precision", "channels_last"), [("fp32", False), ("bf16", True), ("tf32", True)])
def test_the_fast_layout_on_cuda_is_nchw_for_fp32_only(pair: tuple[nrm.NRM, nrm.NRM, torch.Tensor],
                                                        precision: str, channels_last: bool) -> None:
    _, gpu, _ = pair
    assert Runner(gpu, precision=precision).channels_last is channels_last


def test_the_forward_only_pass_on_cuda_equals_the_full_passs_columns(pair: tuple[nrm.NRM, nrm.NRM, torch.Tensor]) -> None:
    # forward-only, ReLUs and adds write in place (NRM._may_overwrite); the full score keeps each ReLU's
    # output for its reverse pass (NRM.full_pass), so it writes in place less
    _, gpu, x = pair
    cols = ["max_logit", "det_mahalanobis"]
    fast, full = gpu.score(x.cuda(), columns=cols), gpu.score(x.cuda())
    for k in cols:
        torch.testing.assert_close(fast[k], full[k], rtol=1e-5, atol=1e-5 * float(full[k].abs().max()))


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_the_in_place_reverse_pass_on_cuda_equals_autograd(pair: tuple[nrm.NRM, nrm.NRM, torch.Tensor],
                                                           channels_last: bool) -> None:
    # scoring's full pass (NRM.full_pass: cuDNN's transposed convolutions, gradients written in place)
    # against the autograd renderer, both in strict fp32 (the runner's fp32 turns TF32 off)
    _, gpu, x = pair
    runner = Runner(gpu, layout="channels_last" if channels_last else "nchw")
    xin = runner.to_layout(x.cuda())
    with torch.no_grad(), runner.autocast():
        ref = gpu.render(xin)
        got = gpu.full_pass(xin, channels_last=channels_last).rendering
    assert got is not None
    for a, b in [(got.h0, ref.h0), (got.eta_channels, ref.eta_channels)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))  # type: ignore[union-attr]


@pytest.mark.parametrize(("precision", "channels_last"), [("fp32", False), ("bf16", True)], ids=["fp32 NCHW", "bf16 channels_last"])
def test_the_compiled_full_pass_on_cuda_equals_the_eager_one(pair: tuple[nrm.NRM, nrm.NRM, torch.Tensor],
                                                             precision: str, channels_last: bool) -> None:
    # Runner(compile=True): the full table's forward and top-down walk as one inductor graph (Triton on CUDA)
    _, gpu, x = pair
    layout = "channels_last" if channels_last else "nchw"
    ref = Runner(gpu, precision=precision, layout=layout).score(x.cuda())
    got = Runner(gpu, precision=precision, layout=layout, compile=True).score(x.cuda())
    for k in ("max_logit", "latent_prior", "recon_sq_error", "det_mahalanobis"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-2, atol=1e-2 * float(ref[k].abs().max()))


def test_bf16_training_on_cuda_gives_back_a_float32_model_that_learned() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=g)
    images = torch.randint(0, 60, (256, 8, 8), generator=g).to(torch.uint8)
    images[labels == 0, :4] += 180  # class 0: a bright top half, class 1: a dark image
    cfg = nrm.TrainConfig(epochs=3, batch_size=32, recon_weight=0.1, seed=0, device="cuda", precision="bf16")
    result = nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=lambda _: None)
    assert result.val_accuracy > 0.9
    assert {t.dtype for t in result.model.state_dict().values()} == {torch.float32}
