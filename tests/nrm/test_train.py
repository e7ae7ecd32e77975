"""nrm.training smoke tests on a tiny synthetic 2-class problem: 8x8 images, class 0 has a bright top
half, class 1 a bright bottom half. Accuracy, falling loss, fitted state, checkpoint round trip,
determinism under a fixed seed, and the label checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support import assert_same_config, tiny_config

import nrm
from nrm.graph import chain
from nrm.ops import Conv, Flatten, GlobalAvgPool, Linear, ReLU
from nrm.training import average_weights


def two_halves(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, 8, 8) and labels (n,): noise in [0, 60) with one half in [180, 256)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    dark = torch.randint(0, 60, (n, 8, 8), generator=g)
    bright = torch.randint(180, 256, (n, 8, 8), generator=g)
    top = torch.zeros(n, 8, 8, dtype=torch.bool)
    top[:, :4] = True
    lit = torch.where(labels[:, None, None] == 0, top, ~top)
    return torch.where(lit, bright, dark).to(torch.uint8), labels


def quiet(_: dict) -> None:
    return None


@pytest.fixture(scope="module")
def trained() -> nrm.TrainResult:
    images, labels = two_halves()
    cfg = nrm.TrainConfig(epochs=3, batch_size=32, recon_weight=0.1, seed=0)
    return nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet)


def _loss_falls(result: nrm.TrainResult) -> None:
    losses = [h["loss"] for h in result.history]
    assert len(losses) >= 3
    assert losses[-1] < losses[0]
    assert all(h["recon"] >= 0 for h in result.history)
    assert result.history[-1]["step"] == result.history[-1]["steps"] == 3 * 8  # 231 train samples / 32


def test_trains_to_high_accuracy(trained: nrm.TrainResult) -> None:
    assert trained.val_accuracy > 0.9
    _loss_falls(trained)
    model = trained.model
    assert not model.training
    # the preprocessing is the training split's channel statistics, kept by the model
    images, labels = two_halves()
    mean = model.config.input.mean[0]
    assert 0.2 < mean < 0.7 and model.config.input.std[0] > 0.1
    preds = model(model.preprocess(images)).argmax(1)
    assert (preds == labels).double().mean().item() > 0.9


def test_fitted_state(trained: nrm.TrainResult) -> None:
    fitted = trained.model.config.fitted
    assert fitted.sigma2 > 0 and len(fitted.log_partition) == 2
    assert fitted.threshold is not None
    column = fitted.threshold.score
    assert nrm.HIGHER_IS_IN.get(column) is True or column in trained.model.extra_columns
    # the threshold keeps (at least) its tpr of the in-distribution validation data it was set on
    images, _ = two_halves()
    s = trained.model.score(trained.model.preprocess(images))[column]
    assert (s >= fitted.threshold.value).double().mean().item() >= 0.8


def test_round_trip_through_checkpoint(trained: nrm.TrainResult, tmp_path: Path) -> None:
    mid = nrm.save(trained.model, tmp_path / "ckpt")
    loaded = nrm.load(tmp_path / "ckpt", expect_model_id=mid)
    assert_same_config(loaded.config, trained.model.config)
    x = trained.model.preprocess(two_halves(16, seed=5)[0])
    a, b = trained.model.score(x), loaded.score(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_trains_with_path_norm() -> None:
    images, labels = two_halves(seed=1)
    cfg = nrm.TrainConfig(epochs=3, batch_size=32, recon_weight=0.1, pathnorm_weight=0.01, seed=1)
    result = nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet)
    assert result.val_accuracy > 0.9
    _loss_falls(result)


def test_fixed_seed_gives_identical_weights() -> None:
    images, labels = two_halves(64, seed=2)
    cfg = nrm.TrainConfig(epochs=1, batch_size=32, recon_weight=0.1, seed=7)
    a = nrm.train(tiny_config(classes=2), images, labels, cfg, progress=quiet).model
    b = nrm.train(tiny_config(classes=2), images, labels, cfg, progress=quiet).model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert_same_config(a.config, b.config)
    c = nrm.train(tiny_config(classes=2), images, labels, nrm.TrainConfig(epochs=1, batch_size=32, seed=8),
                  progress=quiet).model
    assert not torch.equal(c.node_params("conv1")["weight"], a.node_params("conv1")["weight"])


def test_bf16_training_follows_the_fp32_steps_to_bf16_rounding() -> None:
    """The same seed in both precisions: weights that differ (the steps ran in bf16) by a small fraction
    of how far training moved them (the same training), and the model given back in float32."""
    images, labels = two_halves(64, seed=2)
    start = nrm.NRM(tiny_config(classes=2))
    runs = {p: nrm.train(tiny_config(classes=2), images, labels, nrm.TrainConfig(epochs=1, batch_size=32, recon_weight=0.1,
                                                                                  seed=7, precision=p),
                         progress=quiet, init=start).model for p in ("fp32", "bf16")}
    w0 = start.node_params("conv1")["weight"]
    w32, w16 = (runs[p].node_params("conv1")["weight"] for p in ("fp32", "bf16"))
    assert w16.dtype == torch.float32
    assert not torch.equal(w16, w32)
    assert (w16 - w32).norm() < 0.05 * (w32 - w0).norm()


def test_bf16_training_gives_the_model_back_in_its_own_layout() -> None:
    images, labels = two_halves(64, seed=2)
    result = nrm.train(tiny_config(classes=2), images, labels, nrm.TrainConfig(epochs=1, batch_size=32, seed=7,
                                                                                precision="bf16"), progress=quiet)
    assert result.model.node_params("conv1")["weight"].is_contiguous()


def test_fp16_training_is_refused_with_the_reason() -> None:
    images, labels = two_halves(64, seed=2)
    with pytest.raises(ValueError, match=r"unknown training precision 'fp16'.*loss scaling"):
        nrm.train(tiny_config(classes=2), images, labels, nrm.TrainConfig(epochs=1, precision="fp16"), progress=quiet)


@pytest.mark.parametrize("bad", [2, -1, 5])
def test_labels_out_of_range_raise(bad: int) -> None:
    images, labels = two_halves(16)
    labels = labels.clone()
    labels[3] = bad
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        nrm.train(tiny_config(classes=2), images, labels, nrm.TrainConfig(epochs=1), progress=quiet)


def test_length_mismatch_raises() -> None:
    images, labels = two_halves(16)
    with pytest.raises(ValueError, match="16 images but 15 labels"):
        nrm.train(tiny_config(classes=2), images, labels[:15], nrm.TrainConfig(epochs=1), progress=quiet)


def test_augment_shifts_and_mirrors_within_bounds() -> None:
    from nrm.training import augment

    g = torch.Generator().manual_seed(0)
    x = torch.arange(64 * 2 * 5 * 5, dtype=torch.float).reshape(64, 2, 5, 5) + 1  # no zeros in the input
    assert augment(x, "none", 2, g) is x
    shifted = augment(x, "crop", 2, g)
    assert shifted.shape == x.shape
    seen = set()
    for a, b in zip(x, shifted, strict=True):
        # each output is the input moved by (dy, dx) in [-2, 2]^2 with zeros filling in
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(b, torch.roll(a, (dy, dx), (1, 2)) * _window(dy, dx, 5))]
        assert len(hits) == 1, hits
        seen.add(hits[0])
    assert len(seen) > 10  # offsets vary per image
    mirrored = augment(x, "flip-crop", 0, g)
    flipped = [torch.equal(b, a.flip(2)) for a, b in zip(x, mirrored, strict=True)]
    assert all(f or torch.equal(b, a) for f, a, b in zip(flipped, x, mirrored, strict=True))
    assert 10 < sum(flipped) < 54  # about half are mirrored
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment(x, "rotate", 2, g)


def test_cutout_zeroes_one_square_per_image_clipped_at_the_borders() -> None:
    from nrm.training import cutout

    x = torch.ones(200, 2, 8, 8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = out[:, 0] == 0  # (N, H, W)
    assert torch.equal(zeros, out[:, 1] == 0)  # every channel of a pixel together
    for z in zeros:
        rows, cols = z.any(1).nonzero().flatten(), z.any(0).nonzero().flatten()
        # one axis-aligned block of contiguous rows and columns, at most 4 x 4
        assert torch.equal(z, z.any(1)[:, None] & z.any(0)[None, :])
        assert rows.max() - rows.min() + 1 == len(rows) <= 4 and cols.max() - cols.min() + 1 == len(cols) <= 4
    counts = zeros.sum((1, 2))
    assert counts.max() == 16 and counts.min() < 16  # whole squares inside, clipped ones at the borders


def test_cutout_of_zero_pixels_leaves_the_batch_unchanged() -> None:
    from nrm.training import cutout

    x = torch.randn(3, 1, 5, 5)
    assert cutout(x, 0, torch.Generator()) is x


def test_cutout_refuses_a_negative_size() -> None:
    from nrm.training import cutout

    with pytest.raises(ValueError, match="cutout must be >= 0 pixels, got -2"):
        cutout(torch.randn(3, 1, 5, 5), -2, torch.Generator())


def _window(dy: int, dx: int, n: int) -> torch.Tensor:
    """1 where a roll by (dy, dx) of an n x n image brings in real pixels, 0 where it wraps around."""
    rows = torch.arange(n) - dy
    cols = torch.arange(n) - dx
    return (((rows >= 0) & (rows < n))[:, None] & ((cols >= 0) & (cols < n))[None, :]).float()


def test_training_with_augmentation_still_learns() -> None:
    images, labels = two_halves()
    cfg = nrm.TrainConfig(epochs=3, batch_size=32, recon_weight=0.0, seed=0, augment="crop", crop_pad=1)
    result = nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet)
    assert result.val_accuracy > 0.9
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        nrm.train(tiny_config(classes=2), images, labels, nrm.TrainConfig(epochs=1, augment="mixup"), progress=quiet)
    with pytest.raises(ValueError, match="crop_pad must be >= 0 pixels, got -1"):
        nrm.train(tiny_config(classes=2), images, labels, nrm.TrainConfig(epochs=1, augment="crop", crop_pad=-1),
                  progress=quiet)


# --------------------------------------------------------------------------- the resnet-cifar preset


def test_resnet_cifar_depth_8_trains_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(16) % 2
    cfg = nrm.preset("resnet-cifar", width=0.25, classes=2, depth=8)
    assert [n.name for n in cfg.nodes if n.op.type == "add"] == ["layer1.0.add", "layer2.0.add", "layer3.0.add"]
    before = nrm.NRM(cfg)
    torch.manual_seed(0)
    result = nrm.train(cfg, images, labels, nrm.TrainConfig(epochs=1, batch_size=16, seed=0), progress=quiet)
    assert result.history and torch.isfinite(torch.tensor(result.history[-1]["loss"]))
    assert result.model.latent_names == before.latent_names


@pytest.mark.parametrize("depth", [21, 2])
def test_resnet_cifar_bad_depth_names_the_value(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"6n \+ 2.*got {depth}$"):
        nrm.preset("resnet-cifar", classes=2, depth=depth)


def test_depth_is_refused_for_other_presets() -> None:
    with pytest.raises(ValueError, match="depth is an option of resnet-cifar only, not of 'gray28'"):
        nrm.preset("gray28", depth=20)


# --------------------------------------------------------------------------- distillation
def test_distill_loss_is_t_squared_times_the_kl_of_the_softened_distributions() -> None:
    from nrm.training import distill_loss

    student, teacher = torch.tensor([[0.0, 2.0, -1.0]]), torch.tensor([[1.0, 0.0, 3.0]])
    p, q = (teacher / 2).softmax(1), (student / 2).softmax(1)
    expected = 4 * (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(distill_loss(student, teacher, 2.0), expected)


def test_a_student_with_only_the_distillation_term_learns_the_teachers_answers(trained: nrm.TrainResult) -> None:
    images, labels = two_halves(seed=3)
    wrong = 1 - labels  # every label flipped: only the teacher tells the truth
    cfg = nrm.TrainConfig(epochs=3, batch_size=32, recon_weight=0.0, seed=0, distill_weight=1.0, distill_temperature=2.0)
    student = nrm.train(tiny_config(channels=1, size=8, classes=2), images, wrong, cfg, progress=quiet,
                        teacher=trained.model).model
    agree = (student(student.preprocess(images)).argmax(1) == trained.model(trained.model.preprocess(images)).argmax(1))
    assert agree.double().mean().item() > 0.9


def test_a_new_student_takes_the_teachers_normalisation(trained: nrm.TrainResult) -> None:
    images, labels = two_halves(64, seed=4)
    cfg = nrm.TrainConfig(epochs=1, batch_size=32, recon_weight=0.0, seed=0)
    student = nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet,
                        teacher=trained.model).model
    assert (student.config.input.mean, student.config.input.std) == (trained.model.config.input.mean,
                                                                     trained.model.config.input.std)


def test_distillation_refuses_a_teacher_with_other_input(trained: nrm.TrainResult) -> None:
    images, labels = two_halves(64)
    with pytest.raises(ValueError, match=r"the teacher reads input \(1, 8, 8\).*the student \(3, 8, 8\)"):
        nrm.train(tiny_config(channels=3, size=8, classes=2), images[..., None].expand(-1, -1, -1, 3).contiguous(),
                  labels, nrm.TrainConfig(epochs=1), progress=quiet, teacher=trained.model)


def test_distillation_refuses_a_teacher_with_other_classes(trained: nrm.TrainResult) -> None:
    images, labels = two_halves(64)
    with pytest.raises(ValueError, match="the teacher has 2 classes, the student 3"):
        nrm.train(tiny_config(channels=1, size=8, classes=3), images, labels, nrm.TrainConfig(epochs=1),
                  progress=quiet, teacher=trained.model)


def test_distilling_from_several_teachers_uses_the_mean_of_their_logits(trained: nrm.TrainResult) -> None:
    # two copies of one teacher have that teacher's mean logits: the student learns exactly as from one
    images, labels = two_halves(64, seed=5)
    cfg = nrm.TrainConfig(epochs=1, batch_size=32, recon_weight=0.0, seed=0, distill_weight=1.0)
    one = nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet,
                    teacher=trained.model).model
    two = nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, cfg, progress=quiet,
                    teacher=[trained.model, trained.model]).model
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[k], v, rtol=0, atol=0)


def test_an_ensemble_of_teachers_must_share_its_classes(trained: nrm.TrainResult) -> None:
    other = nrm.NRM(replace(tiny_config(channels=1, size=8, classes=3), input=trained.model.config.input))
    images, labels = two_halves(64)
    with pytest.raises(ValueError, match="the teacher has 3 classes, the student 2"):
        nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, nrm.TrainConfig(epochs=1),
                  progress=quiet, teacher=[trained.model, other])


# --------------------------------------------------------------------------- weight averages (model soups)


def test_a_weight_average_is_the_mean_of_every_parameter_and_is_unfitted(trained: nrm.TrainResult) -> None:
    torch.manual_seed(7)
    other = nrm.NRM(trained.model.config)
    soup = average_weights([trained.model, other])
    for k, v in soup.state_dict().items():
        torch.testing.assert_close(v, (trained.model.state_dict()[k] + other.state_dict()[k]) / 2)
    assert soup.config.nodes == trained.model.config.nodes
    assert soup.config.fitted.threshold is None and soup.config.fitted.detector is None


def test_a_weight_average_refuses_networks_of_another_graph(trained: nrm.TrainResult) -> None:
    nodes = chain(("conv1", Conv(1, 5, 3, 1, 1)), ReLU(), GlobalAvgPool(), Flatten(), ("classifier", Linear(5, 2)))
    other = nrm.NRM(replace(trained.model.config, nodes=nodes))
    with pytest.raises(ValueError, match="model 1 has another graph than model 0"):
        average_weights([trained.model, other])


def test_a_weight_average_needs_two_models(trained: nrm.TrainResult) -> None:
    with pytest.raises(ValueError, match="at least 2 models, got 1"):
        average_weights([trained.model])


def test_an_ensemble_of_teachers_must_share_its_normalisation(trained: nrm.TrainResult) -> None:
    other = nrm.NRM(tiny_config(channels=1, size=8, classes=2))  # mean 0.5, std 0.25
    images, labels = two_halves(64)
    with pytest.raises(ValueError, match="the teachers normalise their input differently"):
        nrm.train(tiny_config(channels=1, size=8, classes=2), images, labels, nrm.TrainConfig(epochs=1),
                  progress=quiet, teacher=[trained.model, other])
