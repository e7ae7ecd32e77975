"""`nrm-ood convert`: a user's piecewise-linear PyTorch classifier into an NRM checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.cli.options import at_least, choice, fail
from nrm.names import INPUT_PRESETS, INTERPOLATIONS

app = typer.Typer()
PRESETS_HELP = "; ".join(f"{name} is resize {p['resize']}, crop {p['crop'][0]}, {p['interpolation']}, its mean and std"  # type: ignore[index]
                         for name, p in INPUT_PRESETS.items())


def _floats(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _shape(value: str | None) -> str | None:
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"expected C,H,W (three positive integers), got {value!r}")
    return value


def _module_kwargs(value: str | None) -> str | None:
    if value is not None:
        from jobs.convert import parse_kwargs

        try:
            parse_kwargs(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _crop(value: str | None) -> str | None:
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"expected H or H,W (positive integers), got {value!r}")
    return value


@app.command()
def convert(
    module: Annotated[str, typer.Option(help="The model's factory: its Python file, path/to/file.py:factory, or an importable package.module:factory (e.g. torchvision.models:resnet50), called with --module-kwargs.")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Checkpoint directory to write.")],
    input_shape: Annotated[str | None, typer.Option(callback=_shape, help="C,H,W of the model's input, e.g. 3,32,32 (default: 3 channels at the --crop size).")] = None,
    weights: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="State dict: .safetensors, or .pt/.pth (read with torch.load(weights_only=True)).")] = None,
    mean: Annotated[str | None, typer.Option(help="Per-channel mean of [0, 1] pixels the model was trained with, e.g. 0.485,0.456,0.406 (default 0).")] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225 (default 1).")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names in logit order (default 0..K-1).")] = None,
    module_kwargs: Annotated[str | None, typer.Option(callback=_module_kwargs, help="Keyword arguments of the factory, name=value pairs of Python literals, e.g. num_classes=100,width_per_group=64 (strings quoted: model_name='resnet50').")] = None,
    classes_file: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Class names in logit order, one per line or a JSON list; their count must equal the network's outputs.")] = None,
    resize: Annotated[int | None, at_least(1, "Resize each image's shorter side to this many pixels first, keeping its aspect ratio (as torchvision's Resize(S)).")] = None,
    crop: Annotated[str | None, typer.Option(callback=_crop, help="Then take the centre H,W (or H x H): the network's input size (as torchvision's CenterCrop).")] = None,
    interpolation: Annotated[str | None, choice(INTERPOLATIONS, "Filter of every resize (default bilinear).")] = None,
    preset: Annotated[str | None, choice(tuple(INPUT_PRESETS), f"Standard preprocessing: {PRESETS_HELP}; the options above replace its values.")] = None,
) -> None:
    """Convert your own piecewise-linear PyTorch classifier (ReLU, ReLU6, max-pool, residual adds, ...) into an NRM checkpoint."""
    from jobs.convert import ConvertError, input_spec, parse_kwargs, read_classes
    from jobs.convert import convert as run_convert
    from nrm.config import ConfigError
    from nrm.convert import ConversionError

    shape = tuple(int(v) for v in input_shape.split(",")) if input_shape else None
    hw = [int(v) for v in crop.split(",")] if crop else None
    if classes is not None and classes_file is not None:
        raise fail("give --classes or --classes-file, not both")
    try:
        spec = input_spec(shape, preset=preset, mean=_floats(mean), std=_floats(std), resize=resize,  # type: ignore[arg-type]
                          crop=(hw[0], hw[-1]) if hw else None, interpolation=interpolation)
        names = read_classes(classes_file) if classes_file is not None else classes.split(",") if classes else None
        model, mid = run_convert(module, weights, spec, names, out, parse_kwargs(module_kwargs) if module_kwargs else None,
                                 f"--classes-file {classes_file}" if classes_file is not None else "--classes")
    except (ConvertError, ConversionError, ConfigError) as e:
        raise fail(str(e)) from None
    typer.echo(f"converted {module}: {len(model.config.nodes)} nodes, {len(model.latent_names)} latent layers, "
               f"{len(model.config.classes)} classes; checkpoint {out} (model_id {mid[:12]})")
    if spec.geometry:
        typer.echo(f"input: {spec.channels}x{spec.height}x{spec.width}"
                   + (f", each image's shorter side resized to {spec.resize}" if spec.resize else "")
                   + (f", then its centre {spec.height}x{spec.width} cropped" if spec.crop else "")
                   + f" ({spec.interpolation})")
    typer.echo(f"next: nrm-ood fit-detector --model {out} --data <in-distribution train split> --out {out}")
