"""Training an NRM: cross-entropy + reconstruction through the renderer + optional path normalisation.

    loss = CE(logits, y) + recon_weight * ||x - h(0; y)||^2 / D + pathnorm_weight * PN(W)

h(0; y) is rendered from the TRUE class y with ``create_graph=True``, so the gradient of the
reconstruction term flows through the renderer (a double backward). PN is the NRM paper's
path-normalisation term: the sum over input-output paths of the product of squared weights,
computed in one pass of an all-ones input through the network with squared weights and no biases.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nrm.batchnorm import TrainNorm
from nrm.config import Fitted, InputSpec, ModelConfig
from nrm.fit import DEFAULT_NORMALISER, fit
from nrm.graph import INPUT
from nrm.model import NRM
from nrm.names import AUGMENTATIONS, DEFAULT_DETECTOR, DEFAULT_FEATURES, OPTIMIZERS, TRAIN_PRECISIONS
from nrm.names import DETECTOR_PREFIX as PREFIX
from nrm.runner import Runner, as_runner

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-2  # peak of a one-cycle schedule; AdamW (1e-2 beat 3e-3 and 1e-3 on Fashion-MNIST)
    weight_decay: float = 5e-4
    # "adamw" (decoupled decay: lr x weight_decay per step) or "sgd" (Nesterov momentum 0.9, L2 decay:
    # the ResNet recipe, whose decay actually regularises at fine-tuning learning rates)
    optimizer: str = "adamw"
    label_smoothing: float = 0.0
    recon_weight: float = 1.0  # per-value squared error of h(0) rendered from the true class; 1.0 beat 0.1 on validation OOD (docs/results.md 3b)
    pathnorm_weight: float = 0.0  # off by default: it slows convergence of the small presets
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.1  # held-out in-distribution split for the threshold (never the test split)
    fit_samples: int = 20000  # training samples used to fit sigma^2 and log Z(y)
    normaliser: str = DEFAULT_NORMALISER
    # nrm.detectors' winner, fitted on half of the held-out split; its det_ column separates both
    # low- and high-variance OOD data where latent_loglik fails on one (docs/results-detectors.md)
    detector: str | None = DEFAULT_DETECTOR
    threshold_score: str = PREFIX + DEFAULT_DETECTOR
    detector_features: str = DEFAULT_FEATURES
    # label-preserving augmentation of each training batch: "none", "crop" (shift by up to
    # crop_pad pixels, zero padding = the mean colour) or "flip-crop" (also mirror left-right;
    # right for natural images such as CIFAR-10, wrong for digits)
    augment: str = "none"
    crop_pad: int = 4
    # cutout (DeVries & Taylor 2017): zero (= the mean colour) a square of this side at a random
    # centre of each augmented image, clipped at the borders; 0 = off. 16 is their CIFAR-10 choice.
    cutout: int = 0
    # train with a BatchNorm after every conv and linear bias node, folded back into them at the end
    # (nrm.batchnorm): the converted ResNets' own training set-up; cross-entropy only (recon_weight 0)
    batchnorm: bool = False
    bn_calibration_rows: int = 1024  # the batch that starts each BatchNorm as the identity
    bn_population_rows: int = 10000  # un-augmented training rows whose statistics are folded in
    # knowledge distillation, used when train() is given a teacher: loss = (1 - w) CE + w KD (distill_loss)
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    # numeric precision of the training steps (TRAIN_PRECISIONS): "bf16" runs them under torch.autocast
    # (bf16 convolutions and matmuls; float32 weights, gradients and optimiser state), "tf32" allows TF32
    # on CUDA (float32 on a CPU). "fp32" is strict float32, as in scoring (nrm.precision): on CUDA torch's
    # own default would let cuDNN run the convolutions in TF32, which "tf32" asks for by name. The
    # steps, and the fitting after them, run in the device's fast layout (channels-last on a CPU) in
    # every precision (nrm.runner); the model comes back in float32 and NCHW.
    precision: str = "fp32"


@dataclass
class TrainResult:
    model: NRM
    history: list[dict[str, float]] = field(default_factory=list)
    val_accuracy: float = float("nan")
    seconds: float = 0.0
    val_rows: int = 0  # the held-out rows val_accuracy was measured on


def path_norm(model: NRM) -> Tensor:
    """PN = sum over paths of prod_l w_l^2: all-ones input through the graph with squared weights
    (and scales) and zero biases. Every value stays >= 0, so every gate is open."""
    c, h, w = model.input_shape
    values = {INPUT: torch.ones(1, c, h, w, device=model.mean.device)}
    for node in model.config.nodes:
        p = {k: v.pow(2) if k in ("weight", "scale") else torch.zeros_like(v) for k, v in model.node_params(node.name).items()}
        values[node.name] = node.op.forward([values[i] for i in node.inputs], p)
    return values[model.classifier.name].sum()


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, H, W[, C]) scaled to [0, 1]."""
    x = images.float().div(255.0)
    x = x.reshape(-1, 1) if images.dim() == 3 else x.reshape(-1, images.shape[-1])
    return tuple(x.mean(0).tolist()), tuple(x.std(0).clamp_min(1e-3).tolist())






def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
    Network"): the batch mean of

        T^2 KL(softmax(teacher / T) || softmax(student / T))

    logits (B, K) each; the T^2 keeps its gradient on the scale of the cross-entropy's."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def check_teacher(student: ModelConfig, teacher: NRM, same_normalisation: bool = True) -> None:
    """Raise ValueError unless ``teacher`` takes the student's images (shape and, when
    ``same_normalisation``, mean and std) and has as many classes: it scores the student's
    augmented batches as they are, and its logits are read in the student's class order."""
    mine, theirs = student.input, teacher.config.input
    if mine.shape != theirs.shape or (same_normalisation and (mine.mean, mine.std) != (theirs.mean, theirs.std)):
        raise ValueError(f"the teacher reads input {theirs.shape} with mean {list(theirs.mean)} and std "
                         f"{list(theirs.std)}, the student {mine.shape} with mean {list(mine.mean)} and std "
                         f"{list(mine.std)}; distillation needs the same input and normalisation")
    if len(teacher.config.classes) != len(student.classes):
        raise ValueError(f"the teacher has {len(teacher.config.classes)} classes, the student "
                         f"{len(student.classes)}; distillation needs the same classes in the same order")


def average_weights(models: Sequence[NRM]) -> NRM:
    """The uniform average of the weights of networks fine-tuned from one start: a "model soup"
    (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time"). Fine-tuned from the same weights, such networks often
    lie in one basin of the loss, where their average can classify better than each of them (it did for
    nine ResNet-20 runs: docs/results.md section 5); it is one network of the same graph, so the NRM
    reading holds for it unchanged.
    Every model must have the same graph, input and classes. The average is unfitted: fit it (nrm.fit,
    ``nrm-ood fit-detector``) before scoring OOD."""
    if len(models) < 2:
        raise ValueError(f"a weight average needs at least 2 models, got {len(models)}")
    first = models[0].config
    for i, m in enumerate(models[1:], 1):
        for what, mine, theirs in (("graph", m.config.nodes, first.nodes), ("input", m.config.input, first.input),
                                   ("classes", m.config.classes, first.classes)):
            if mine != theirs:
                raise ValueError(f"model {i} has another {what} than model 0; a weight average needs networks "
                                 "of one graph, input and classes (fine-tuned from the same start)")
    out = NRM(replace(first, fitted=Fitted()))
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) for k, v in states[0].items()})
    return out.eval().requires_grad_(False)


def make_optimizer(model: NRM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.9; both at ``cfg.lr`` with ``cfg.weight_decay``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected one of {list(OPTIMIZERS)}")


def attach_batchnorm(model: NRM | Runner, x: Tensor) -> TrainNorm:
    """Give every conv and linear bias node of ``model`` a BatchNorm (nrm.batchnorm), started so that
    the network computes the same function on the normalised batch ``x`` (N, C, H, W)."""
    runner = as_runner(model)
    net = runner.model
    names = [n for n in net.bias_nodes if set(net.node_params(n)) == {"weight", "bias"}]
    norm = TrainNorm({n: net.node_params(n)["bias"] for n in names}).to(x.device)
    net.train_norm = norm
    norm.calibrating = True
    with torch.no_grad():
        runner(x)
    norm.calibrating = False
    return norm


def fold_batchnorm(model: NRM | Runner, clean: Iterator[Tensor]) -> None:
    """Replace each BatchNorm's statistics by their average over the un-augmented batches ``clean``
    (precise BatchNorm), fold them into the weights and biases and detach the norms: ``model`` is a
    plain NRM again, with its graph unchanged."""
    runner = as_runner(model)
    net = runner.model
    norm = net.train_norm
    if norm is None:
        raise ValueError("fold_batchnorm: the model has no BatchNorm attached (attach_batchnorm)")
    net.train()
    with torch.no_grad():
        for k, x in enumerate(clean, 1):
            norm.momentum = 1.0 / k  # a cumulative average over the batches
            runner(x)
    norm.fold({n: net.node_params(n) for n in norm.names})
    net.train_norm = None


def check_augment(mode: str, pad: int, cutout: int = 0) -> None:
    """Raise ValueError naming a bad augmentation mode, crop padding or cutout size."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {mode!r}; expected one of {AUGMENTATIONS}")
    if pad < 0:
        raise ValueError(f"crop_pad must be >= 0 pixels, got {pad}")
    if cutout < 0:
        raise ValueError(f"cutout must be >= 0 pixels, got {cutout}")


def augment(x: Tensor, mode: str, pad: int, gen: torch.Generator) -> Tensor:
    """Randomly mirror (mode "flip-crop") and shift (both modes) each image of a normalised batch.

    x: (B, C, H, W). The shift is a crop of the zero-padded image at a random offset in
    [0, 2 * pad] per axis, so content moves by up to ``pad`` pixels and zeros fill in."""
    check_augment(mode, pad)
    if mode == "none":
        return x
    b, _, h, w = x.shape
    if mode == "flip-crop":
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)  # (B,)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad == 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return xp[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def cutout(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Zero a ``size`` x ``size`` square of each image of a normalised batch (B, C, H, W), centred at
    a uniform random pixel and clipped at the borders (DeVries & Taylor 2017); 0 = unchanged."""
    check_augment("none", 0, size)
    if size == 0:
        return x
    b, _, h, w = x.shape
    top = torch.randint(0, h, (b, 1), generator=gen).to(x.device) - size // 2  # (B, 1) first row/col
    left = torch.randint(0, w, (b, 1), generator=gen).to(x.device) - size // 2
    r, c = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_r = (r >= top) & (r < top + size)  # (B, H)
    in_c = (c >= left) & (c < left + size)  # (B, W)
    keep = ~(in_r[:, :, None] & in_c[:, None, :])  # (B, H, W): outside the square
    return x * keep[:, None].to(x.dtype)


def held_out_split(n: int, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(held-out rows, training rows) of ``n`` rows: a permutation drawn from ``gen``, its first
    max(1, int(n * fraction)) rows held out. :func:`train` draws it first from a generator seeded
    with ``TrainConfig.seed``; ``nrm-ood fit-detector`` and ``average`` draw it again the same way."""
    perm = torch.randperm(n, generator=gen)
    k = max(1, int(n * fraction))
    return perm[:k], perm[k:]


def batches(model: NRM, images: Tensor, size: int, order: Tensor | None = None) -> Iterator[Tensor]:
    """Normalised batches of ``images`` (uint8) on the model's device, in ``order`` if given."""
    idx = order if order is not None else torch.arange(len(images))
    for i in range(0, len(idx), size):
        yield model.preprocess(images[idx[i : i + size]])


def accuracy(model: NRM | Runner, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """The fraction of uint8 ``images`` whose predicted class is ``labels``."""
    runner = as_runner(model)
    with torch.no_grad():
        preds = torch.cat([runner(x).argmax(1).cpu() for x in batches(runner.model, images, batch_size)])
    return float((preds == labels).float().mean())


def _losses(model: NRM, x: Tensor, y: Tensor, cfg: TrainConfig, teachers: list[Runner],
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One batch's logits (B, K), cross-entropy, reconstruction term and total loss."""
    if cfg.recon_weight > 0:
        p = model.autograd_pass(x, y, create_graph=True)
        logits, h0 = p.logits, p.rendering.h0  # type: ignore[union-attr]
        recon = (x - h0).pow(2).mean()
    else:
        logits, recon = model(x), x.new_zeros(())
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    fit_term = ce
    if teachers:
        with torch.no_grad():  # (B, K) the teachers' mean logits of the same augmented batch
            soft = torch.stack([t(x).float() for t in teachers]).mean(0)
        kd = distill_loss(logits, soft, cfg.distill_temperature)
        fit_term = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd
    loss = fit_term + cfg.recon_weight * recon
    if cfg.pathnorm_weight > 0:
        loss = loss + cfg.pathnorm_weight * path_norm(model)
    return logits, ce, recon, loss


def train_step(runner: Runner, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, cfg: TrainConfig,
               teachers: list[Runner]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One optimiser step of ``runner.model`` on batch ``x`` (B, C, H, W), labels ``y`` (B,), in the
    runner's precision and layout (the teachers' forward too; losses in float32, autocast's policy).
    Returns :func:`_losses`' (logits, cross-entropy, reconstruction term, total loss)."""
    with runner.autocast():
        out = _losses(runner.model, runner.to_layout(x), y, cfg, teachers)
    opt.zero_grad(set_to_none=True)
    out[3].backward()
    opt.step()
    return out


def train(
    config: ModelConfig,
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    init: NRM | None = None,
    teacher: NRM | Runner | Sequence[NRM | Runner] | None = None,
) -> TrainResult:
    """Train an NRM of architecture ``config`` on uint8 ``images`` (N, H, W[, C]) and int ``labels``,
    then fit sigma^2, log Z(y) and the threshold (nrm.fit). ``progress`` gets a dict every 20 steps.

    With ``init`` (a loaded or converted NRM) it is fine-tuned instead: its graph, weights and input
    normalisation are kept (``config`` is ignored), and its fitted state is fitted anew. With
    ``teacher`` (a trained NRM with the same input and classes, e.g. a deeper network fine-tuned on
    the same data; or a Runner of one) the cross-entropy is mixed with :func:`distill_loss` on the
    teacher's logits of the same augmented batch, with weight ``cfg.distill_weight``; given several
    teachers, on the mean of their logits (an ensemble that classifies better than any one of them)."""
    cfg = cfg or TrainConfig()
    config = init.config if init is not None else config
    teachers = [as_runner(t) for t in ([] if teacher is None else [teacher] if isinstance(teacher, NRM | Runner)
                                       else teacher)]
    _check_training(config, images, labels, cfg, [t.model for t in teachers], fine_tune=init is not None)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    val_idx, train_idx = held_out_split(len(images), cfg.val_fraction, gen)
    model = _first_model(config, images[train_idx[:20000]], cfg, init, [t.model for t in teachers])
    labels = labels.long()
    runner = Runner(model, precision=cfg.precision)  # before the optimiser: the layout moves the weights
    history = _optimise(runner, images, labels, train_idx, cfg, teachers, gen, _reporter(progress, start, cfg.epochs))
    scorer = Runner(model)  # fitted in float32, in the fast layout
    if cfg.batchnorm:
        fold_batchnorm(scorer, batches(model, images, 512, train_idx[: cfg.bn_population_rows]))
    model.eval().requires_grad_(False)
    fit(scorer, batches(model, images, 512, train_idx[: cfg.fit_samples]), batches(model, images, 512, val_idx),
        normaliser=cfg.normaliser, threshold_score=cfg.threshold_score, detector=cfg.detector,
        detector_features=cfg.detector_features)
    val_acc = accuracy(scorer, images[val_idx], labels[val_idx])
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return TrainResult(model, history, val_acc, time.perf_counter() - start, len(val_idx))


def _check_training(config: ModelConfig, images: Tensor, labels: Tensor, cfg: TrainConfig, teachers: list[NRM],
                    fine_tune: bool) -> None:
    """A ValueError naming what :func:`train` cannot train with."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    check_augment(cfg.augment, cfg.crop_pad, cfg.cutout)
    if teachers:  # a new network takes the teachers' normalisation (_first_model)
        for t in teachers:
            check_teacher(config, t, same_normalisation=fine_tune)
        norms = {(tuple(t.config.input.mean), tuple(t.config.input.std)) for t in teachers}
        if len(norms) > 1:
            raise ValueError(f"the teachers normalise their input differently ({sorted(norms)}); an ensemble "
                             "of teachers scores one batch, so it needs one mean and std")
        if not 0 <= cfg.distill_weight <= 1 or cfg.distill_temperature <= 0:
            raise ValueError(f"distillation needs a weight in [0, 1] and a temperature > 0, got "
                             f"{cfg.distill_weight} and {cfg.distill_temperature}")
    if cfg.batchnorm and cfg.recon_weight > 0:
        raise ValueError(f"training with BatchNorm needs recon_weight 0, got {cfg.recon_weight}: in training "
                         "mode a BatchNorm mixes the samples of a batch, so h(0) would not render one sample")
    if cfg.precision not in TRAIN_PRECISIONS:
        raise ValueError(f"unknown training precision {cfg.precision!r}; expected one of {list(TRAIN_PRECISIONS)} "
                         "(fp16 would need loss scaling: train in bf16)")
    if labels.min() < 0 or labels.max() >= len(config.classes):
        raise ValueError(f"labels must lie in [0, {len(config.classes)}), got [{int(labels.min())}, {int(labels.max())}]")


def _first_model(config: ModelConfig, images: Tensor, cfg: TrainConfig, init: NRM | None, teachers: list[NRM]) -> NRM:
    """The network training starts from, on ``cfg.device``: a copy of ``init`` (its normalisation
    stays), else a new one of ``config`` normalised as the teachers are, or by ``images``' channel
    statistics."""
    if init is not None:
        return copy.deepcopy(init).to(cfg.device).requires_grad_(True)
    if teachers:
        mean, std = tuple(teachers[0].config.input.mean), tuple(teachers[0].config.input.std)
    else:
        mean, std = channel_stats(images)
    spec = config.input
    return NRM(replace(config, input=InputSpec(spec.channels, spec.height, spec.width, mean, std))).to(cfg.device)


Report = Callable[[int, int, int, tuple[Tensor, Tensor, Tensor, Tensor], Tensor], dict[str, float]]


def _optimise(runner: Runner, images: Tensor, labels: Tensor, train_idx: Tensor, cfg: TrainConfig,
              teachers: list[Runner], gen: torch.Generator, report: Report) -> list[dict[str, float]]:
    """The training steps: ``cfg.epochs`` passes over ``train_idx``, each in a fresh order drawn from
    ``gen``, under a one-cycle schedule; every 20th step (and each epoch's last) is reported. Returns
    the reports."""
    model = runner.model
    if cfg.batchnorm:
        attach_batchnorm(runner, next(batches(model, images, cfg.bn_calibration_rows, train_idx)))
    total = cfg.epochs * ((len(train_idx) + cfg.batch_size - 1) // cfg.batch_size)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total, pct_start=0.15)
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = augment(model.preprocess(images[idx]), cfg.augment, cfg.crop_pad, gen)  # (B, C, H, W)
            x = cutout(x, cfg.cutout, gen)
            y = labels[idx].to(x.device)
            out = train_step(runner, opt, x, y, cfg, teachers)
            sched.step()
            step += 1
            if step % 20 == 0 or i + cfg.batch_size >= len(order):
                history.append(report(epoch + 1, step, total, out, y))
    return history


def _reporter(progress: Callable[[dict[str, Any]], None] | None, start: float, epochs: int) -> Report:
    """What :func:`_optimise` reports a step with: its record, handed to ``progress`` (else logged)."""
    def report(epoch: int, step: int, total: int, out: tuple[Tensor, Tensor, Tensor, Tensor], y: Tensor,
               ) -> dict[str, float]:
        logits, ce, recon, loss = out
        rec = {"epoch": epoch, "epochs": epochs, "step": step, "steps": total, "loss": float(loss.detach()),
               "ce": float(ce.detach()), "recon": float(recon.detach()),
               "acc": float((logits.argmax(1) == y).float().mean()), "seconds": time.perf_counter() - start}
        if progress:
            progress(rec)
        else:
            log.info("epoch %d step %d loss %.4f", rec["epoch"], step, rec["loss"])
        return rec
    return report
