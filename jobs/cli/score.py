"""`nrm-ood score` and `nrm-ood filter`: the scoring job, and the rows its scores keep."""

from __future__ import annotations

from typing import Annotated

import typer

from jobs.cli.options import (
    Address,
    BatchSize,
    EndpointUrl,
    ModelUri,
    at_least,
    choice,
    fail,
    finish,
    run_id_callback,
)
from jobs.images import Policy
from nrm.names import COLUMNS, POSTHOC, PRECISIONS

app = typer.Typer()


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


# Every column a checkpoint can make; det_* are the fitted detectors' columns.
SCORE_NAMES = (*COLUMNS, *POSTHOC)


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


@app.command()
def score(
    model: ModelUri,
    input: Annotated[str, typer.Option(help="Parquet file, directory, glob or s3:// prefix.")],
    output: Annotated[str, typer.Option(help="Output directory or s3:// prefix; the run goes to <output>/<run-id>/.")],
    actors: Annotated[int | None, at_least(1, "Scoring actors (default: one per GPU, else as the CPUs allow).")] = None,
    gpus_per_actor: Annotated[float, at_least(0, "GPUs per actor (fractions share a GPU).")] = 0.0,
    cpus_per_actor: Annotated[float, at_least(0, "CPUs per actor (fractions allowed).", strict=True)] = 1.0,
    batch_size: BatchSize = 512,
    run_id: Annotated[str | None, typer.Option(callback=run_id_callback, help="Run id (default: time-stamped): letters, digits, '.', '_', '-'. A committed id is never redone; an uncommitted one is resumed.")] = None,
    incremental: Annotated[bool, typer.Option(help="Score only input files no committed run under --output covers.")] = False,
    address: Address = None,
    image_column: Annotated[str | None, typer.Option(help="Image column (default: guessed).")] = None,
    id_column: Annotated[str | None, typer.Option(help="Id column (default: 'id', else <file>#<row>).")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column (default: 'label' if present).")] = None,
    resize_policy: Annotated[Policy, typer.Option(help="adapt: convert mode and resize to the model; strict: mismatches are error rows.")] = Policy.adapt,
    endpoint_url: EndpointUrl = None,
    resume: Annotated[str | None, typer.Option(callback=run_id_callback, help="Finish the uncommitted run RUN_ID (interrupted, or its driver died): input files an earlier attempt completed are not scored again.")] = None,
    rows_per_file: Annotated[int, at_least(1, "Scored rows per output Parquet file.")] = 50_000,
    actor_resource: Annotated[list[str] | None, typer.Option(
        callback=_resources, help="NAME=AMOUNT of a custom Ray resource each scoring actor needs (repeatable): "
                                  "places the actors on the nodes that offer it.")] = None,
    columns: Annotated[str | None, typer.Option(
        callback=_columns, help="Comma-separated score columns to make (default: the full table). pred and the "
        "threshold score are always made; columns that need no top-down pass (max_softmax, max_logit, energy, "
        "det_* on gate statistics, mahalanobis_feat, knn, vim) skip the backward pass.")] = None,
    precision: Annotated[str, choice(PRECISIONS, "Numeric precision of scoring: fp32, or bf16 / fp16 / tf32 "
                                                 "(faster; docs/benchmarks.md gives the AUROC change).")] = "fp32",
    compile: Annotated[bool, typer.Option(help="torch.compile each actor's scoring pass (forward-only, or the full "
                                               "table's forward and top-down walk as one graph): faster per batch, but "
                                               "each new batch shape first compiles (long jobs only).")] = False,
) -> None:
    """Score Parquet image shards on Ray Data and commit a run (Parquet tables + _manifest.json)."""
    from jobs.pipeline import Interrupted, JobError, ScoreOptions, run_score, summary

    opts = ScoreOptions(model=model, input=input, output=output, run_id=run_id, actors=actors,
                        gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                        incremental=incremental, address=address, image_column=image_column, id_column=id_column,
                        label_column=label_column, resize_policy=resize_policy, endpoint_url=endpoint_url,
                        resume=resume, rows_per_file=rows_per_file,
                        actor_resources=dict(_resource_pairs(actor_resource or [])) or None,
                        columns=tuple(columns.split(",")) if columns else None,
                        precision=precision, compile=compile)
    try:
        result = run_score(opts, echo=typer.echo)
    except Interrupted as e:
        raise fail(str(e), 130) from None
    except JobError as e:
        raise fail(str(e)) from None
    finish(summary(result), result.exit_code)


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
