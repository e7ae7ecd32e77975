"""`nrm-ood convert`: a user's piecewise-linear PyTorch classifier into an NRM checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.cli.options import fail

app = typer.Typer()


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
