"""`nrm-ood evaluate` and `nrm-ood report`: OOD metrics on labelled sets, and an audit run's report.

Exit codes as jobs/cli/__init__.py says; evaluate's 3: written, but some input files of a set could
not be read (listed in metrics.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.cli.options import Address, BatchSize, EndpointUrl, ModelUri, at_least, fail, finish, named_sets

app = typer.Typer()


@app.command()
def evaluate(
    model: ModelUri,
    in_: Annotated[str, typer.Option("--in", help="In-distribution Parquet: file, directory, glob or s3:// prefix.")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Local directory for scores/, metrics.json, metrics.md, "
                                      "report.html and figures/.")],
    near: Annotated[list[str] | None, typer.Option(callback=named_sets("--near"), metavar="NAME=URI",
                                                   help="A near-OOD set, NAME=URI; repeat for several. Its group's "
                                                   "mean AUROC and FPR@95TPR are reported.")] = None,
    far: Annotated[list[str] | None, typer.Option(callback=named_sets("--far"), metavar="NAME=URI",
                                                  help="A far-OOD set, NAME=URI; repeat for several. Its group's "
                                                  "mean AUROC and FPR@95TPR are reported.")] = None,
    ood: Annotated[list[str] | None, typer.Option(callback=named_sets("--ood"), metavar="NAME=URI",
                                                  help="An OOD set in no group, NAME=URI; repeat for several.")] = None,
    limit: Annotated[int | None, at_least(1, "Use only the first N rows of each set (files in sorted "
                                              "order, copied to <out>/inputs/<name>.parquet).")] = None,
    batch_size: BatchSize = 512,
    address: Address = None,
    endpoint_url: EndpointUrl = None,
) -> None:
    """Score an in-distribution set and OOD sets with the Ray job; write OOD metrics and an HTML report.

    Give at least one OOD set (--near, --far or --ood). Runs go to <out>/scores with run ids `in` and
    `ood-<NAME>`; a committed run is reused."""
    import jobs.evaluate
    from jobs.evaluate import EvalOptions, EvaluateError, group_sets, parse_ood, summary

    try:
        sets, groups = group_sets(parse_ood(ood or []), parse_ood(near or [], "--near"), parse_ood(far or [], "--far"))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if not sets:
        raise typer.BadParameter("give at least one OOD set: --near, --far or --ood NAME=URI")
    opts = EvalOptions(model=model, input=in_, ood=sets, out=out, limit=limit, batch_size=batch_size, address=address,
                       endpoint_url=endpoint_url, groups=groups)
    try:
        result = jobs.evaluate.evaluate(opts, echo=typer.echo)
    except EvaluateError as e:
        raise fail(str(e)) from None
    finish(summary(result), result.exit_code)


@app.command()
def report(
    scores: Annotated[str, typer.Option(help="A committed run (<output>/<run-id>) or an output root (all its runs).")],
    out: Annotated[Path, typer.Option(file_okay=False, help="Local directory for report.html and report.json.")],
    input: Annotated[str | None, typer.Option(help="The scored dataset (or where it now lives): shows the most OOD "
                                              "images with their renderings.")] = None,
    model: Annotated[str | None, typer.Option(help="Checkpoint for the renderings (default: the run manifest's model).")] = None,
    top: Annotated[int, at_least(1, "How many of the most OOD rows to show.")] = 16,
    endpoint_url: EndpointUrl = None,
) -> None:
    """Write a self-contained HTML report of an audit run: score distribution, OOD rate per class and
    per file, the most OOD images and the error rows."""
    from jobs.report import ReportError, ReportOptions, build_report

    try:
        build_report(ReportOptions(scores=scores, out=out, input=input, model=model, top=top, endpoint_url=endpoint_url),
                     echo=typer.echo)
    except ReportError as e:
        raise fail(str(e)) from None

