"""`nrm-ood demo`: the whole workflow on scikit-learn's digits, on embedded Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.cli.options import at_least

app = typer.Typer()


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working directory for data, checkpoint and scores.")] = Path("demo-out"),
    epochs: Annotated[int, at_least(1, "Training passes over the 1,257 training digits.")] = 30,
) -> None:
    """Train on scikit-learn's digits, score in- and out-of-distribution shards on embedded Ray, print AUROCs."""
    import shutil

    from jobs.demo import run

    if out.exists():
        shutil.rmtree(out)
    result = run(out, epochs=epochs, echo=typer.echo)
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])
