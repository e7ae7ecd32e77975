"""`nrm-ood train` and `nrm-ood average`: make a checkpoint from labelled images, or from checkpoints."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.cli.options import DEVICES, EndpointUrl, at_least, choice, fail
from nrm import names

app = typer.Typer()


@app.command()
def train(
    data: Annotated[str, typer.Option(help="Training Parquet: file, directory, glob or s3:// prefix (HF image layout).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    arch: Annotated[str, choice(("auto", *names.PRESETS), "Architecture preset; auto picks by the images' size.")] = "auto",
    width: Annotated[float | None, typer.Option(help="Width multiplier of the preset (default: the preset's).")] = None,
    epochs: Annotated[int, at_least(1, "Passes over the training rows.")] = 3,
    batch_size: Annotated[int, at_least(1, "Images per training step.")] = 128,
    lr: Annotated[float, at_least(0, "Peak learning rate of the one-cycle schedule.", strict=True)] = 1e-2,
    optimizer: Annotated[str, choice(names.OPTIMIZERS, "adamw, or sgd (Nesterov momentum 0.9, L2 weight decay: the usual ResNet fine-tuning recipe).")] = "adamw",
    weight_decay: Annotated[float, at_least(0, "Weight decay (decoupled for adamw, L2 for sgd).")] = 5e-4,
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.5, help="Label smoothing of the cross-entropy, 0 to 0.5.")] = 0.0,
    recon_weight: Annotated[float, at_least(0, "Weight of the reconstruction term.")] = 1.0,
    pathnorm_weight: Annotated[float, at_least(0, "Weight of the path-normalisation term.")] = 0.0,
    normaliser: Annotated[str, choice(names.NORMALISERS, "Estimator of log Z(y) (nrm.fit; docs/results.md).")] = "none",
    test: Annotated[str | None, typer.Option(help="Labelled test Parquet: accuracy is reported, nothing is fitted on it.")] = None,
    limit: Annotated[int | None, at_least(1, "Use only the first N training rows.")] = None,
    device: Annotated[str, choice(("auto", *DEVICES), "auto: cuda when torch sees a GPU, else cpu.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the held-out split, the initial weights and the batch order.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Fraction of the rows held out, 0 to 0.5 (at least one row): the validation accuracy and the detector's threshold come from them, training from the rest. Lower it to train the final model on (nearly) all rows once the choices are made.")] = 0.1,
    augment: Annotated[str, choice(names.AUGMENTATIONS, "Augment training batches: random shifts (crop), plus left-right mirroring (flip-crop, natural images only).")] = "none",
    cutout: Annotated[int, at_least(0, "Cutout: zero a square of this many pixels a side in each training image (16 for CIFAR-10); 0 = off.")] = 0,
    batchnorm: Annotated[bool, typer.Option(help="Train with a BatchNorm after every conv and linear layer, folded back into them at the end (the checkpoint's graph is unchanged); needs --recon-weight 0. For fine-tuning converted ResNets, whose own BatchNorms were folded.")] = False,
    endpoint_url: EndpointUrl = None,
    depth: Annotated[int | None, at_least(8, "Depth 6n+2 of the resnet-cifar preset (default 20).")] = None,
    init: Annotated[Path | None, typer.Option(exists=True, file_okay=False, help="Fine-tune this checkpoint (e.g. from `nrm-ood convert`) instead of a preset: its graph, weights and normalisation are kept.")] = None,
    teacher: Annotated[list[Path] | None, typer.Option(exists=True, file_okay=False, help="Distil from this trained checkpoint (same input, normalisation and classes; e.g. a deeper network fine-tuned on the same data): the loss mixes cross-entropy with its soft labels. Repeat it to distil from an ensemble (the mean of their logits).")] = None,
    distill_weight: Annotated[float, typer.Option(min=0.0, max=1.0, help="With --teacher: weight w of the distillation term, loss = (1 - w) CE + w KD, 0 to 1.")] = 0.5,
    distill_temperature: Annotated[float, at_least(0, "With --teacher: softmax temperature T of the distillation term.", strict=True)] = 4.0,
    precision: Annotated[str, choice(names.TRAIN_PRECISIONS, "Numeric precision of the training steps: fp32, bf16 (mixed precision: bf16 convolutions, float32 weights; faster on a CPU with AMX and on GPUs, docs/benchmarks.md; the checkpoint is float32) or tf32 (TF32 convolutions and matmuls on CUDA; fp32 is strict float32 there).")] = "fp32",
) -> None:
    """Train an NRM on labelled images (or fine-tune one with --init) and write a checkpoint directory."""
    import torch

    import nrm
    from jobs.storage import Store

    store, dev = Store(endpoint_url), _device(device)
    _check_start(init, arch, width, depth, batchnorm, recon_weight)
    t0 = time.perf_counter()
    start, name, x, y = _training_data(data, arch, init, limit, store)
    tutors = _teachers(teacher or [], dev)
    classes = int(y.max()) + 1
    cfg = _network(start, init, name, width, classes, depth)
    typer.echo(f"training {name} (width {width or 'default'}) on {len(x)} images {tuple(x.shape[1:])}, "
               f"{classes} classes, device {dev}; loaded in {time.perf_counter() - t0:.1f}s")
    tc = nrm.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                         label_smoothing=label_smoothing, recon_weight=recon_weight, pathnorm_weight=pathnorm_weight,
                         seed=seed, device=dev, val_fraction=val_fraction, normaliser=normaliser, augment=augment,
                         cutout=cutout, batchnorm=batchnorm, distill_weight=distill_weight,
                         distill_temperature=distill_temperature, precision=precision)
    try:
        result = nrm.train(cfg, torch.from_numpy(x), torch.from_numpy(y), tc, progress=_progress, init=start,
                           teacher=tutors or None)
    except ValueError as e:
        raise fail(str(e)) from None
    sys.stderr.write("\n")
    report = {"arch": name, "width": width if width is not None else "preset default", "train_rows": len(x),
              **asdict(tc), "teacher": [str(t) for t in teacher] if teacher else None,
              "seconds": round(result.seconds, 1), "val_accuracy": round(result.val_accuracy, 4),
              "val_rows": result.val_rows, "model_id": nrm.save(result.model, out)}
    _write_report(out, report | (_test_accuracy(test, result.model, store) if test else {}))


def _write_report(out: Path, report: dict[str, Any]) -> None:
    """train_report.json beside the checkpoint: the options the network was trained with and how it did."""
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report, indent=2))
    typer.echo(f"checkpoint written to {out}")


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda was given but torch sees no CUDA device")
    return device


def _check_start(init: Path | None, arch: str, width: float | None, depth: int | None, batchnorm: bool,
                 recon_weight: float) -> None:
    """Refuse the combinations of options that cannot train."""
    if init is not None and (arch != "auto" or width is not None or depth is not None):
        raise fail("--init fine-tunes the checkpoint's own network; drop --arch, --width and --depth")
    if batchnorm and recon_weight > 0:
        raise fail(f"--batchnorm trains with cross-entropy only, but --recon-weight is {recon_weight}; add "
                   "--recon-weight 0 (a BatchNorm in training mode mixes a batch's samples, so h(0) renders none of them)")


def _training_data(data: str, arch: str, init: Path | None, limit: int | None, store: Any) -> tuple[Any, str, Any, Any]:
    """(the --init NRM or None, the preset name or "init:<path>", uint8 images, labels)."""
    import nrm
    from jobs.datasets import DatasetError, load_labelled, probe_shape
    from jobs.storage import StorageError

    try:
        start = nrm.load(init) if init is not None else None
        shape = start.input_shape if start is not None else probe_shape(data, store)
        name = arch if arch != "auto" else {(1, 28, 28): "gray28", (3, 32, 32): "rgb32-small",
                                            (1, 8, 8): "digits8"}.get(shape)
        if start is not None:
            name = f"init:{init}"
        elif name is None:
            raise fail(f"no preset for images of shape {shape}; give --arch")
        x, y = load_labelled(data, shape, limit, store)
    except (StorageError, DatasetError, ValueError) as e:
        raise fail(str(e)) from None
    return start, name, x, y


def _teachers(paths: list[Path], device: str) -> list[Any]:
    """The --teacher checkpoints, loaded for their forward pass only."""
    import nrm
    from nrm.runner import Runner

    try:
        return [Runner(nrm.load(t, device=device)) for t in paths]  # forward only, in the fast layout
    except ValueError as e:  # nrm.checkpoint.CheckpointError names the file and what is wrong
        raise fail(f"--teacher: {e}") from None


def _network(start: Any, init: Path | None, name: str, width: float | None, classes: int, depth: int | None) -> Any:
    """The network to train: the --init checkpoint's (which must have room for the labels), else the preset's."""
    import nrm

    if start is not None and classes > len(start.config.classes):
        raise fail(f"--data has labels up to {classes - 1}, but checkpoint {init} has {len(start.config.classes)} classes")
    try:
        return start.config if start is not None else nrm.preset(name, width, classes=classes, depth=depth)
    except ValueError as e:
        raise fail(str(e)) from None


def _progress(rec: dict[str, float]) -> None:
    sys.stderr.write(f"\repoch {rec['epoch']}/{rec['epochs']} step {rec['step']}/{rec['steps']} "
                     f"loss {rec['loss']:.3f} ce {rec['ce']:.3f} recon {rec['recon']:.3f} acc {rec['acc']:.3f} "
                     f"{rec['seconds']:.0f}s")
    sys.stderr.flush()


def _test_accuracy(test: str, model: Any, store: Any) -> dict[str, Any]:
    """{"test_rows", "test_accuracy"} of ``model`` on the labelled Parquet ``test`` (nothing is fitted on it)."""
    import torch

    from jobs.datasets import DatasetError, load_labelled
    from jobs.storage import StorageError
    from nrm.training import accuracy

    try:
        xt, yt = load_labelled(test, model.input_shape, None, store)
    except (StorageError, DatasetError) as e:
        raise fail(str(e)) from None
    return {"test_rows": len(xt), "test_accuracy": round(accuracy(model, torch.from_numpy(xt), torch.from_numpy(yt)), 4)}


@app.command()
def average(
    model: Annotated[list[Path], typer.Option(exists=True, file_okay=False, help="A checkpoint to average; give it two or more times. All must share one graph, input and classes: fine-tuned from the same start.")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Checkpoint directory to write.")],
    data: Annotated[str | None, typer.Option(help="The training Parquet the models were fine-tuned on: the average's top-1 on the rows `nrm-ood train` held out (--seed, --val-fraction) is printed, to choose with.")] = None,
    seed: Annotated[int, typer.Option(help="With --data: the seed `nrm-ood train` used.")] = 0,
    val_fraction: Annotated[float, at_least(0, "With --data: the held-out fraction `nrm-ood train` used.", strict=True)] = 0.1,
    test: Annotated[str | None, typer.Option(help="Labelled test Parquet: the average's top-1 is printed (nothing is fitted on it).")] = None,
    endpoint_url: EndpointUrl = None,
) -> None:
    """Average the weights of networks fine-tuned from one start into one network of the same graph (a "model soup")."""
    import torch

    import nrm
    from jobs.datasets import DatasetError, load_labelled
    from jobs.storage import StorageError, Store
    from nrm.training import accuracy, average_weights, held_out_split

    try:
        soup = average_weights([nrm.load(m) for m in model])
    except ValueError as e:  # a checkpoint that cannot be read, or networks that cannot be averaged
        raise fail(str(e)) from None
    store = Store(endpoint_url)
    if data is not None:
        try:
            x, y = load_labelled(data, soup.input_shape, None, store)
        except (StorageError, DatasetError) as e:
            raise fail(str(e)) from None
        held, _ = held_out_split(len(x), val_fraction, torch.Generator().manual_seed(seed))
        typer.echo(f"validation accuracy {accuracy(soup, torch.from_numpy(x)[held], torch.from_numpy(y)[held]):.4f} "
                   f"({len(held)} held-out rows of {data})")
    if test is not None:
        typer.echo(f"test accuracy {_test_accuracy(test, soup, store)['test_accuracy']:.4f} ({test})")
    mid = nrm.save(soup, out)
    typer.echo(f"averaged {len(model)} checkpoints into {out} (model_id {mid[:12]}); its detector is not fitted")
    typer.echo(f"next: nrm-ood fit-detector --model {out} --data <in-distribution train split> --out {out}")
