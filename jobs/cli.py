"""The ``nrm-ood`` command line (Typer). Thin: parse, call jobs/nrm, print, exit with a code.

Exit codes: 0 done; 1 the run cannot proceed (one clear sentence on stderr); 2 bad usage;
3 run committed but incomplete (failed input files, listed in the manifest); 4 another run
committed the same run id first; 130 interrupted (Ctrl-C), nothing committed.
"""

from __future__ import annotations

import enum
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.cli_errors import fail
from jobs.cli_eval import register as _register_eval
from jobs.cli_options import Address, BatchSize, EndpointUrl, ModelUri, at_least, named_sets
from jobs.cli_runs import register as _register_runs
from jobs.images import Policy

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Score image datasets for out-of-distribution samples with the Neural Rendering Model.")


# Choices that name library constants: the names of nrm.names, which imports no torch (so that
# `nrm-ood --help` does not); tests/jobs/test_cli.py (test_cli_choices_match_the_library) holds each
# enum equal to its list there: Arch = "auto" + PRESETS, Augment = AUGMENTATIONS, Normaliser = NORMALISERS,
# Detector = DETECTORS, FeatureSet = FEATURE_SETS, Precision = PRECISIONS, TrainPrecision = TRAIN_PRECISIONS.
class Arch(str, enum.Enum):
    auto = "auto"
    gray28 = "gray28"
    gray28_flat = "gray28-flat"
    rgb32_allconv = "rgb32-allconv"
    rgb32_small = "rgb32-small"
    digits8 = "digits8"
    resnet_cifar = "resnet-cifar"


class Augment(str, enum.Enum):
    none = "none"
    crop = "crop"
    flip_crop = "flip-crop"


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    sgd = "sgd"


class Normaliser(str, enum.Enum):
    none = "none"
    class_mean = "class_mean"
    harmonic = "harmonic"


def _resource_pairs(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for spec in specs:
        name, sep, amount = spec.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise typer.BadParameter(f"{spec!r} is not NAME=AMOUNT with AMOUNT > 0 (e.g. second=1)")
        out.append((name, value))
    return out


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    tf32 = "tf32"


# fp16 training would need loss scaling
class TrainPrecision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    tf32 = "tf32"


# nrm.names.COLUMNS and POSTHOC; det_* are the fitted detectors' columns.
SCORE_NAMES = ("pred", "max_softmax", "max_logit", "energy", "latent_prior_layers", "latent_prior", "latent_loglik",
               "recon_sq_error", "loglik_bound", "mahalanobis_feat", "knn", "vim")


def _columns(value: str | None) -> str | None:
    if value is None:
        return None
    names = [c.strip() for c in value.split(",")]
    if bad := [c for c in names if c not in SCORE_NAMES and not c.startswith("det_")]:
        raise typer.BadParameter(f"unknown score column(s) {', '.join(map(repr, bad))}; expected some of "
                                 f"{', '.join(SCORE_NAMES)} or det_<detector>")
    return ",".join(names)


def _resources(specs: list[str] | None) -> list[str] | None:
    _resource_pairs(specs or [])
    return specs


class Detector(str, enum.Enum):
    typicality = "typicality"
    mahalanobis = "mahalanobis"
    gmm = "gmm"
    mahalanobis_energy = "mahalanobis_energy"


class FeatureSet(str, enum.Enum):
    eta = "eta"
    layers = "layers"
    layers_recon = "layers_recon"
    channels = "channels"
    channels_recon = "channels_recon"
    gates = "gates"
    gates_recon = "gates_recon"
    gates_acts = "gates_acts"
    gates_channels_recon = "gates_channels_recon"


DEFAULT_DETECTOR = Detector.mahalanobis  # nrm.names.DEFAULT_DETECTOR
DEFAULT_FEATURES = FeatureSet.gates_acts  # nrm.names.DEFAULT_FEATURES


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _device(d: Device) -> str:
    import torch

    if d is Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d is Device.cuda and not torch.cuda.is_available():
        raise fail("--device cuda was given but torch sees no CUDA device")
    return d.value


# ---------------------------------------------------------------------------- train
@app.command()
def train(
    data: Annotated[str, typer.Option(help="Training Parquet: file, directory, glob or s3:// prefix (HF image layout).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    arch: Annotated[Arch, typer.Option(help="Architecture preset; auto picks by the images' size.")] = Arch.auto,
    width: Annotated[float | None, typer.Option(help="Width multiplier of the preset (default: the preset's).")] = None,
    epochs: Annotated[int, at_least(1, "Passes over the training rows.")] = 3,
    batch_size: Annotated[int, at_least(1, "Images per training step.")] = 128,
    lr: Annotated[float, at_least(0, "Peak learning rate of the one-cycle schedule.", strict=True)] = 1e-2,
    optimizer: Annotated[Optimizer, typer.Option(help="adamw, or sgd (Nesterov momentum 0.9, L2 weight decay: the usual ResNet fine-tuning recipe).")] = Optimizer.adamw,
    weight_decay: Annotated[float, at_least(0, "Weight decay (decoupled for adamw, L2 for sgd).")] = 5e-4,
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.5, help="Label smoothing of the cross-entropy, 0 to 0.5.")] = 0.0,
    recon_weight: Annotated[float, at_least(0, "Weight of the reconstruction term.")] = 1.0,
    pathnorm_weight: Annotated[float, at_least(0, "Weight of the path-normalisation term.")] = 0.0,
    normaliser: Annotated[Normaliser, typer.Option(help="Estimator of log Z(y) (nrm.fit; docs/results.md).")] = Normaliser.none,
    test: Annotated[str | None, typer.Option(help="Labelled test Parquet: accuracy is reported, nothing is fitted on it.")] = None,
    limit: Annotated[int | None, at_least(1, "Use only the first N training rows.")] = None,
    device: Annotated[Device, typer.Option(help="auto: cuda when torch sees a GPU, else cpu.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split, the initial weights and the batch order.")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Fraction of the rows held out, 0 to 0.5 (at least one row): the validation accuracy and the detector's threshold come from them, training from the rest. Lower it to train the final model on (nearly) all rows once the choices are made.")] = 0.1,
    augment: Annotated[Augment, typer.Option(help="Augment training batches: random shifts (crop), plus left-right mirroring (flip-crop, natural images only).")] = Augment.none,
    cutout: Annotated[int, at_least(0, "Cutout: zero a square of this many pixels a side in each training image (16 for CIFAR-10); 0 = off.")] = 0,
    batchnorm: Annotated[bool, typer.Option(help="Train with a BatchNorm after every conv and linear layer, folded back into them at the end (the checkpoint's graph is unchanged); needs --recon-weight 0. For fine-tuning converted ResNets, whose own BatchNorms were folded.")] = False,
    endpoint_url: EndpointUrl = None,
    depth: Annotated[int | None, at_least(8, "Depth 6n+2 of the resnet-cifar preset (default 20).")] = None,
    init: Annotated[Path | None, typer.Option(exists=True, file_okay=False, help="Fine-tune this checkpoint (e.g. from `nrm-ood convert`) instead of a preset: its graph, weights and normalisation are kept.")] = None,
    teacher: Annotated[list[Path] | None, typer.Option(exists=True, file_okay=False, help="Distil from this trained checkpoint (same input, normalisation and classes; e.g. a deeper network fine-tuned on the same data): the loss mixes cross-entropy with its soft labels. Repeat it to distil from an ensemble (the mean of their logits).")] = None,
    distill_weight: Annotated[float, typer.Option(min=0.0, max=1.0, help="With --teacher: weight w of the distillation term, loss = (1 - w) CE + w KD, 0 to 1.")] = 0.5,
    distill_temperature: Annotated[float, at_least(0, "With --teacher: softmax temperature T of the distillation term.", strict=True)] = 4.0,
    precision: Annotated[TrainPrecision, typer.Option(help="Numeric precision of the training steps: fp32, bf16 (mixed precision: bf16 convolutions, float32 weights; 2-3x faster on a CPU with AMX and on GPUs; the checkpoint is float32) or tf32 (TF32 convolutions and matmuls on CUDA; fp32 is strict float32 there).")] = TrainPrecision.fp32,
) -> None:
    """Train an NRM on labelled images (or fine-tune one with --init) and write a checkpoint directory."""
    import json
    import time

    import torch

    import nrm
    from jobs.storage import Store

    store = Store(endpoint_url)
    dev = _device(device)
    if init is not None and (arch is not Arch.auto or width is not None or depth is not None):
        raise fail("--init fine-tunes the checkpoint's own network; drop --arch, --width and --depth")
    if batchnorm and recon_weight > 0:
        raise fail(f"--batchnorm trains with cross-entropy only, but --recon-weight is {recon_weight}; add "
                   "--recon-weight 0 (a BatchNorm in training mode mixes a batch's samples, so h(0) renders none of them)")
    t0 = time.perf_counter()
    start, name, x, y = _training_data(data, arch, init, limit, store)
    try:
        tutors = [nrm.load(t, device=dev).use_fast_layout() for t in teacher or []]  # forward only
    except ValueError as e:  # nrm.checkpoint.CheckpointError names the file and what is wrong
        raise fail(f"--teacher: {e}") from None
    classes = int(y.max()) + 1
    if start is not None and classes > len(start.config.classes):
        raise fail(f"--data has labels up to {classes - 1}, but checkpoint {init} has {len(start.config.classes)} classes")
    try:
        cfg = start.config if start is not None else nrm.preset(name, width, classes=classes, depth=depth)
    except ValueError as e:
        raise fail(str(e)) from None
    typer.echo(f"training {name} (width {width or 'default'}) on {len(x)} images {tuple(x.shape[1:])}, "
               f"{classes} classes, device {dev}; loaded in {time.perf_counter() - t0:.1f}s")

    tc = nrm.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, recon_weight=recon_weight,
                         pathnorm_weight=pathnorm_weight, seed=seed, device=dev, normaliser=normaliser.value,
                         augment=augment.value, optimizer=optimizer.value, weight_decay=weight_decay,
                         label_smoothing=label_smoothing, cutout=cutout, distill_weight=distill_weight,
                         distill_temperature=distill_temperature, batchnorm=batchnorm, val_fraction=val_fraction,
                         precision=precision.value)
    try:
        result = nrm.train(cfg, torch.from_numpy(x), torch.from_numpy(y), tc, progress=_progress, init=start,
                           teacher=tutors or None)
    except ValueError as e:
        raise fail(str(e)) from None
    sys.stderr.write("\n")
    mid = nrm.save(result.model, out)
    report = {"arch": name, "width": width if width is not None else "preset default", "train_rows": len(x), "epochs": epochs, "augment": augment.value,
              "optimizer": optimizer.value, "lr": lr, "weight_decay": weight_decay, "label_smoothing": label_smoothing,
              "cutout": cutout, "batchnorm": batchnorm, "precision": precision.value, "teacher": [str(t) for t in teacher] if teacher else None,
              "distill_weight": distill_weight if teacher else None, "seconds": round(result.seconds, 1),
              "val_accuracy": round(result.val_accuracy, 4), "val_rows": result.val_rows, "model_id": mid, "device": dev}
    if test:
        report.update(_test_accuracy(test, result.model, store))
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report, indent=2))
    typer.echo(f"checkpoint written to {out}")


def _training_data(data: str, arch: Arch, init: Path | None, limit: int | None, store: Any) -> tuple[Any, str, Any, Any]:
    """(the --init NRM or None, the preset name or "init:<path>", uint8 images, labels)."""
    import nrm
    from jobs.datasets import DatasetError, load_labelled, probe_shape
    from jobs.storage import StorageError

    try:
        start = nrm.load(init) if init is not None else None
        shape = start.input_shape if start is not None else probe_shape(data, store)
        name = arch.value if arch is not Arch.auto else {(1, 28, 28): "gray28", (3, 32, 32): "rgb32-small",
                                                         (1, 8, 8): "digits8"}.get(shape)
        if start is not None:
            name = f"init:{init}"
        elif name is None:
            raise fail(f"no preset for images of shape {shape}; give --arch")
        x, y = load_labelled(data, shape, limit, store)
    except (StorageError, DatasetError, ValueError) as e:
        raise fail(str(e)) from None
    return start, name, x, y


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


@app.command("fit-detector")
def fit_detector(
    model: Annotated[Path, typer.Option(help="Checkpoint directory to start from.")],
    data: Annotated[str, typer.Option(help="The model's in-distribution TRAIN Parquet (never the test split).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write (weights unchanged, same model_id).")],
    detector: Annotated[Detector, typer.Option(help="Detector on the NRM statistics (nrm.detectors).")] = DEFAULT_DETECTOR,
    features: Annotated[FeatureSet, typer.Option(help="Feature set (nrm.detectors.features).")] = DEFAULT_FEATURES,
    seed: Annotated[int, typer.Option(help="Seed `nrm-ood train` used: its held-out rows are the ones used.")] = 0,
    val_fraction: Annotated[float, at_least(0, "Held-out fraction `nrm-ood train` used.", strict=True)] = 0.1,
    candidates: Annotated[bool, typer.Option(help="Also keep every other candidate detector as a det_* column.")] = False,
    val_ood: Annotated[list[str] | None, typer.Option(
        callback=named_sets("--val-ood"),
        help="NAME=PARQUET validation OOD set (repeatable; never a set you report on). With it, --detector and "
             "--features are not used: the candidate with the best worst-case validation AUROC wins.")] = None,
    val_ood_limit: Annotated[int, at_least(1, "Rows read of each --val-ood set.")] = 2000,
    endpoint_url: EndpointUrl = None,
    detector_rows: Annotated[int | None, at_least(1, "Fit the detector on this many training rows (not held out) "
        "instead of half the held-out rows; all held-out rows then set the threshold and make the choice. A "
        "Gaussian on thousands of gate features (ResNet-56: 4,064) needs more rows than a held-out half.")] = None,
    baselines: Annotated[bool, typer.Option(help="Also fit the field's post-hoc baselines (Mahalanobis on the penultimate features, KNN k=50, ViM: columns mahalanobis_feat, knn, vim) on the training rows that were not held out.")] = False,
) -> None:
    """(Re)fit a detector on an existing checkpoint, on the rows of its training split that
    `nrm-ood train` held out (same seed and fraction), and make it the checkpoint's threshold score.
    With --val-ood the detector is chosen on those validation OOD sets; the table is printed and saved."""
    import torch

    import nrm
    from jobs.datasets import DatasetError, load_images, load_labelled
    from jobs.evaluate import parse_ood
    from jobs.storage import StorageError, Store
    from nrm.fit import refit
    from nrm.training import batches, held_out_split

    try:
        m = nrm.load(model).use_fast_layout()  # scores its rows as the actors do (channels-last on a CPU)
        store = Store(endpoint_url)
        x, y = load_labelled(data, m.input_shape, None, store)
        refit_rows, train_rows = held_out_split(len(x), val_fraction, torch.Generator().manual_seed(seed))
        if baselines:
            from nrm.fit import fit_posthoc

            fit_posthoc(m, batches(m, torch.from_numpy(x), 512, train_rows), torch.from_numpy(y)[train_rows])
        ood = {name: batches(m, torch.from_numpy(load_images(uri, m.input_shape, val_ood_limit, store)), 512)
               for name, uri in parse_ood(val_ood or [], "--val-ood").items()}
        fit_rows = train_rows[:detector_rows] if detector_rows else None
        det = refit(m, batches(m, torch.from_numpy(x), 512, refit_rows), detector.value, features.value,
                    candidates=candidates, val_ood=ood or None,
                    fit_batches=batches(m, torch.from_numpy(x), 512, fit_rows) if fit_rows is not None else None)
    except (nrm.CheckpointError, StorageError, DatasetError, ValueError) as e:
        raise fail(str(e)) from None
    mid = nrm.save(m, out)
    th = m.config.fitted.threshold
    assert th is not None
    for column, row in det.selection.items():
        typer.echo(f"  validation AUROC {column}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                   + f" (worst {min(row.values()):.3f})")
    fitted_on = f"{len(fit_rows)} training rows" if fit_rows is not None else f"half of {len(refit_rows)} held-out rows"
    typer.echo(f"fitted {det.main.name}[{det.main.features}] on {fitted_on}; threshold {th.score} < {th.value:.4g} "
               f"flags OOD; wrote {out} (model_id {mid[:12]})")
    if baselines:
        typer.echo(f"fitted the post-hoc baselines {', '.join(m.posthoc_columns)} on {len(train_rows)} training rows")


# ---------------------------------------------------------------------------- score
@app.command()
def score(
    model: ModelUri,
    input: Annotated[str, typer.Option(help="Parquet file, directory, glob or s3:// prefix.")],
    output: Annotated[str, typer.Option(help="Output directory or s3:// prefix; the run goes to <output>/<run-id>/.")],
    actors: Annotated[int | None, at_least(1, "Scoring actors (default: one per GPU, else as the CPUs allow).")] = None,
    gpus_per_actor: Annotated[float, at_least(0, "GPUs per actor (fractions share a GPU).")] = 0.0,
    cpus_per_actor: Annotated[float, at_least(0, "CPUs per actor (fractions allowed).", strict=True)] = 1.0,
    batch_size: BatchSize = 512,
    run_id: Annotated[str | None, typer.Option(help="Run id (default: time-stamped). A committed id is never redone; an uncommitted one is resumed.")] = None,
    incremental: Annotated[bool, typer.Option(help="Score only input files no committed run under --output covers.")] = False,
    address: Address = None,
    image_column: Annotated[str | None, typer.Option(help="Image column (default: guessed).")] = None,
    id_column: Annotated[str | None, typer.Option(help="Id column (default: 'id', else <file>#<row>).")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column (default: 'label' if present).")] = None,
    resize_policy: Annotated[Policy, typer.Option(help="adapt: convert mode and resize to the model; strict: mismatches are error rows.")] = Policy.adapt,
    endpoint_url: EndpointUrl = None,
    resume: Annotated[str | None, typer.Option(help="Finish the uncommitted run RUN_ID (interrupted, or its driver died): input files an earlier attempt completed are not scored again.")] = None,
    rows_per_file: Annotated[int, at_least(1, "Scored rows per output Parquet file.")] = 50_000,
    actor_resource: Annotated[list[str] | None, typer.Option(
        callback=_resources, help="NAME=AMOUNT of a custom Ray resource each scoring actor needs (repeatable): "
                                  "places the actors on the nodes that offer it.")] = None,
    columns: Annotated[str | None, typer.Option(
        callback=_columns, help="Comma-separated score columns to make (default: the full table). pred and the "
        "threshold score are always made; columns that need no top-down pass (max_softmax, max_logit, energy, "
        "det_* on gate statistics, mahalanobis_feat, knn, vim) skip the backward pass.")] = None,
    precision: Annotated[Precision, typer.Option(help="Numeric precision of scoring: fp32, or bf16 / fp16 / tf32 "
                                                      "(faster; docs/benchmarks.md gives the AUROC change).")] = Precision.fp32,
    compile: Annotated[bool, typer.Option(help="torch.compile each actor's scoring pass (forward-only, or the full "
                                               "table's forward and top-down walk as one graph): faster per batch, but "
                                               "each new batch shape first compiles (long jobs only).")] = False,
) -> None:
    """Score Parquet image shards on Ray Data and commit a run (Parquet tables + _manifest.json)."""
    from jobs.pipeline import Interrupted, JobError, ScoreOptions, run_score, summary

    opts = ScoreOptions(model, input, output, run_id, actors, gpus_per_actor, cpus_per_actor, batch_size,
                        incremental, address, image_column, id_column, label_column, resize_policy, endpoint_url,
                        resume=resume, rows_per_file=rows_per_file,
                        actor_resources=dict(_resource_pairs(actor_resource or [])) or None,
                        columns=tuple(columns.split(",")) if columns else None,
                        precision=precision.value, compile=compile)
    try:
        result = run_score(opts, echo=typer.echo)
    except Interrupted as e:
        raise fail(str(e), 130) from None
    except JobError as e:
        raise fail(str(e)) from None
    typer.echo(summary(result))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("filter")
def filter_(
    scores: Annotated[str, typer.Option(help="A committed run (<output>/<run-id>) or an output root (all its runs).")],
    input: Annotated[str, typer.Option(help="The dataset that was scored.")],
    output: Annotated[str, typer.Option(help="Where to write the in-distribution subset (Parquet).")],
    endpoint_url: EndpointUrl = None,
) -> None:
    """Write the rows of INPUT that the scores keep (status ok and not is_ood), columns unchanged."""
    from jobs.filtering import FilterError, filter_dataset
    from jobs.storage import StorageError, Store

    try:
        stats = filter_dataset(Store(endpoint_url), scores, input, output)
    except (FilterError, StorageError) as e:
        raise fail(str(e)) from None
    typer.echo(f"kept {stats['kept']} of {stats['rows']} rows ({stats['ood']} OOD, {stats['error']} error, "
               f"{stats['unscored']} not scored) -> {output}")
    for uri in stats["skipped"]:
        typer.echo(f"skipped {uri}: no scored rows in these runs (not scored, or a failed input)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working directory for data, checkpoint and scores.")] = Path("demo-out"),
    epochs: Annotated[int, at_least(1, "Training passes over the 1,257 training digits (30: about 20 s of training, about a minute "
                                        "for the whole demo on 2 cores).")] = 30,
) -> None:
    """Train on scikit-learn's digits, score in- and out-of-distribution shards on embedded Ray, print AUROCs."""
    import shutil

    from jobs.demo import run

    if out.exists():
        shutil.rmtree(out)
    result = run(out, epochs=epochs, echo=typer.echo)
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])


BENCH_DOC = "docs/benchmarks.md"


class BenchDevice(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class BenchSection(str, enum.Enum):
    speed = "speed"
    compile = "compile"
    precision = "precision"
    job = "job"


@app.command()
def bench(
    out: Annotated[Path | None, typer.Option(help="Also write the report to this markdown file; by default it is only printed.")] = None,
    write_docs: Annotated[bool, typer.Option(help=f"Write the tracked {BENCH_DOC} (instead of --out).")] = False,
    rows: Annotated[int, at_least(1, "Images in the job's 1x dataset (10x is also run).")] = 20000,
    batch_size: Annotated[int, at_least(1, "CPU batch size (a GPU runs 512 and 4096).")] = 512,
    reps: Annotated[int, at_least(1, "Timed repetitions per measurement.")] = 5,
    section: Annotated[list[BenchSection] | None, typer.Option(help="Run only these sections (repeatable): speed (NRM/plain ratios), compile (the same with torch.compile; compiles take minutes), precision, job (end to end, memory). Default: all.")] = None,
    shared: Annotated[Path | None, typer.Option(help="The shared folder with models/cifar10-resnet and datasets/ (default ../shared when it exists): the pretrained ResNets and the precision AUROC.")] = None,
    device: Annotated[list[BenchDevice] | None, typer.Option(help="Measure on these devices (repeatable; the compile and precision sections use the last). Default: cpu, and cuda when torch sees a GPU.")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Sections speed and compile: only the models whose label contains this text, e.g. ResNet (repeatable). Default: every preset and ResNet.")] = None,
) -> None:
    """Measure the speed and memory targets; print the report (write it with --out, or --write-docs)."""
    import torch

    from jobs.bench import run

    out = Path(BENCH_DOC) if write_docs else out
    command = "nrm-ood bench " + shlex.join(sys.argv[2:]) if len(sys.argv) > 2 else "nrm-ood bench"
    if shared is None and Path("../shared").is_dir():
        shared = Path("../shared")
    sections = tuple(s.value for s in section) if section else tuple(s.value for s in BenchSection)
    devices = tuple(d.value for d in device or ())
    if "cuda" in devices and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda was asked for, but torch sees no CUDA GPU here; "
                                 "leave --device out or run on a machine with one", param_hint="--device")
    text = run(out, rows, batch_size, reps, typer.echo, command.strip(), sections, shared, devices, tuple(only or ()))
    typer.echo(text)
    if out is not None:
        typer.echo(f"wrote {out}")


_register_eval(app)
_register_runs(app)  # runs, audit (jobs/cli_runs.py)


def _floats(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _shape(value: str) -> str:
    parts = value.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"expected C,H,W (three positive integers), got {value!r}")
    return value


@app.command()
def convert(
    module: Annotated[str, typer.Option(help="The model's Python file and factory, path/to/file.py:factory (called with no arguments).")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Checkpoint directory to write.")],
    input_shape: Annotated[str, typer.Option(callback=_shape, help="C,H,W of the model's input, e.g. 3,32,32.")],
    weights: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="State dict: .safetensors, or .pt/.pth (read with torch.load(weights_only=True)).")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-channel mean of [0, 1] pixels the model was trained with, e.g. 0.485,0.456,0.406 (default 0).")] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225 (default 1).")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names in logit order (default 0..K-1).")] = None,
) -> None:
    """Convert your own piecewise-linear PyTorch classifier (ReLU, max-pool, residual adds, ...) into an NRM checkpoint."""
    from jobs.convert import ConvertError
    from jobs.convert import convert as run_convert
    from nrm.config import ConfigError
    from nrm.convert import ConversionError

    shape = tuple(int(v) for v in input_shape.split(","))
    try:
        model, mid = run_convert(module, weights, shape, _floats(mean), _floats(std),  # type: ignore[arg-type]
                                 classes.split(",") if classes else None, out)
    except (ConvertError, ConversionError, ConfigError) as e:
        raise fail(str(e)) from None
    typer.echo(f"converted {module}: {len(model.config.nodes)} nodes, {len(model.latent_names)} latent layers, "
               f"{len(model.config.classes)} classes; checkpoint {out} (model_id {mid[:12]})")
    typer.echo(f"next: nrm-ood fit-detector --model {out} --data <in-distribution train split> --out {out}")


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


def main() -> None:
    from jobs.allocator import keep_freed_memory

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # batches reuse freed pages instead of faulting fresh ones in (jobs/allocator.py)
    app()


if __name__ == "__main__":
    main()
