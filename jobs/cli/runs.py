"""`nrm-ood runs` and `nrm-ood audit`: the committed runs under an output, their drift, and the alert.

Exit codes as jobs/cli/__init__.py says; audit's 5: the run drifted beyond the limits (what a
RayCronJob or CI step pages on); 1 also when OUTPUT is missing or holds no committed run.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from jobs.cli.options import EndpointUrl, fail, run_id_callback
from jobs.drift import DEFAULT_ALPHA, DEFAULT_MAX_DRIFT

app = typer.Typer()

DRIFT_EXIT = 5

Output = Annotated[str, typer.Argument(metavar="OUTPUT", help="Output directory or s3:// prefix given to `score`.")]


def _fraction(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be a fraction in [0, 1], got {value:g}")
    return value


def _probability(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise typer.BadParameter(f"must be a probability in (0, 1), got {value:g}")
    return value


MaxFlagged = Annotated[float | None, typer.Option(callback=_fraction, help="Alert when more than this fraction of a run's ok rows is flagged OOD (and chance cannot explain it). Default: twice the checkpoint's expected rate.")]
MaxDrift = Annotated[float, typer.Option(callback=_fraction, help="Alert when the KS distance between a run's threshold scores and the checkpoint's in-distribution reference exceeds this (and chance cannot explain it).")]
Alpha = Annotated[float, typer.Option(callback=_probability, help="Significance level of the binomial and KS tests.")]
MaxErrors = Annotated[float | None, typer.Option(callback=_fraction, help="Alert when more than this fraction of a run's rows are error rows. Default: not checked.")]


@app.command()
def runs(
    output: Output,
    json_: Annotated[bool, typer.Option("--json", help="One JSON list of the runs, for machines.")] = False,
    files: Annotated[str | None, typer.Option(metavar="RUN_ID", callback=run_id_callback, help="Print the part file URIs of committed run RUN_ID, one per line.")] = None,
    prune: Annotated[bool, typer.Option(help="Remove files that no committed run uses (attempts of killed or resumed drivers) and write missing Delta logs. Uncommitted runs are left for --resume.")] = False,
    max_flagged: MaxFlagged = None,
    max_drift: MaxDrift = DEFAULT_MAX_DRIFT,
    alpha: Alpha = DEFAULT_ALPHA,
    max_errors: MaxErrors = None,
    endpoint_url: EndpointUrl = None,
) -> None:
    """List the committed runs under OUTPUT in time order: rows, errors, flagged % against expected, the
    KS drift distance and a verdict."""
    import jobs.runs
    from jobs.drift import Limits
    from jobs.storage import StorageError, Store

    store = Store(endpoint_url)
    try:
        if files is not None:
            typer.echo("\n".join(jobs.runs.files(store, output, files)))
            return
        if prune:
            for run_id, (gone, logged) in jobs.runs.prune(store, output).items():
                if gone or logged:
                    typer.echo(f"{run_id}: removed {len(gone)} unused file(s)" + ("; wrote its Delta log" if logged else ""))
            return
        rows = jobs.runs.history(store, output, Limits(max_flagged, max_drift, alpha, max_errors))
    except StorageError as e:
        raise fail(f"{e}; expected the --output given to `score`") from None
    if json_:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    if not rows:
        typer.echo(f"no committed runs under {output}")
        return
    typer.echo(f"{'created':25} {'run id':36} {'rows':>8} {'errors':>6} {'flagged':>8} {'expected':>8} {'KS':>6}  verdict")
    for r in rows:
        d = r.drift
        f = f"{d.flagged_fraction:.1%}" if d.flagged_fraction is not None else "-"
        exp = f"{d.expected:.1%}" if d.expected is not None else "-"
        ks = f"{d.ks:.3f}" if d.ks is not None else "-"
        typer.echo(f"{r.created:25} {r.run_id:36} {r.rows:>8} {d.errors:>6} {f:>8} {exp:>8} {ks:>6}  {r.verdict}")


@app.command()
def audit(
    output: Output,
    max_flagged: MaxFlagged = None,
    max_drift: MaxDrift = DEFAULT_MAX_DRIFT,
    alpha: Alpha = DEFAULT_ALPHA,
    max_errors: MaxErrors = None,
    run_id: Annotated[str | None, typer.Option(callback=run_id_callback, help="Audit this committed run instead of the latest.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the run's row as JSON.")] = False,
    endpoint_url: EndpointUrl = None,
) -> None:
    """Exit 5 when the latest committed run under OUTPUT drifted beyond the limits (0 otherwise): a
    scheduled audit's alert. Prints the run's verdict line."""
    import jobs.runs
    from jobs.drift import Limits
    from jobs.storage import StorageError, Store

    try:
        r = jobs.runs.audit(Store(endpoint_url), output, Limits(max_flagged, max_drift, alpha, max_errors), run_id)
    except StorageError as e:
        raise fail(f"{e}; expected the --output given to `score`") from None
    typer.echo(json.dumps(r.to_json(), indent=2) if json_ else f"{r.run_id} ({r.created}): {r.line}")
    if r.verdict == "drift":
        raise typer.Exit(DRIFT_EXIT)

