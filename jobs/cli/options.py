"""What the commands share: the one way a command stops on an error, bounded options, choices, and
the options several commands take (one definition each).

A bounded option is ``at_least``, a choice ``choice``: ``--help`` shows the range or the choices, and
a value outside them is a usage error (exit 2) that names the value. Nothing here imports torch:
``nrm-ood --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

DEVICES = ("cpu", "cuda")  # where torch runs: --device of train and bench


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` to stderr and return the typer.Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def finish(summary: str, exit_code: int) -> None:
    """Print a run's summary; a non-zero code (incomplete, lost the commit race) ends the command with it."""
    typer.echo(summary)
    if exit_code:
        raise typer.Exit(exit_code)


def at_least(low: float, help: str, *, strict: bool = False) -> Any:
    """A ``typer.Option`` that refuses values below ``low`` (or equal to it when ``strict``) at parse time,
    naming the value ("must be >= 1, got 0"), and shows the range at the end of its help ("[>= 1]")."""
    sign = ">" if strict else ">="

    def check(value: float | None) -> float | None:
        if value is not None and (value <= low if strict else value < low):
            raise typer.BadParameter(f"must be {sign} {low:g}, got {value:g}")
        return value

    return typer.Option(callback=check, help=f"{help} [{sign} {low:g}]")


def choice(values: Sequence[str], help: str) -> Any:
    """A ``typer.Option`` (of one string, or a repeatable list of them) whose every value must be one of
    ``values``, refused at parse time naming it ("'x' is not one of 'a', 'b'."); ``--help`` shows
    [a|b]. The values come from the library (nrm.names, jobs.bench.SECTIONS), so no list is spelt twice."""

    def check(value: str | list[str] | None) -> str | list[str] | None:
        for v in [] if value is None else [value] if isinstance(value, str) else value:
            if v not in values:
                raise typer.BadParameter(f"{v!r} is not one of {', '.join(map(repr, values))}.")
        return value

    return typer.Option(callback=check, metavar="[" + "|".join(values) + "]", help=help)


def run_id_callback(value: str | None) -> str | None:
    """A Typer callback: a run id that can name a folder (jobs.pipeline.check_run_id), checked at parse time."""
    from jobs.pipeline import check_run_id

    try:
        return None if value is None else check_run_id(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


EndpointUrl = Annotated[str | None, typer.Option(help="S3-compatible endpoint (default: AWS_ENDPOINT_URL).")]
Address = Annotated[str | None, typer.Option(help="Ray cluster to join (auto, ray://host:10001); default: embedded Ray.")]
ModelUri = Annotated[str, typer.Option(help="Checkpoint directory or s3:// prefix.")]
BatchSize = Annotated[int, at_least(1, "Images per scoring batch.")]


def named_sets(option: str) -> Callable[[list[str] | None], list[str] | None]:
    """A Typer callback that checks repeated ``option NAME=URI`` values at parse time (jobs.evaluate.parse_ood)."""

    def check(values: list[str] | None) -> list[str] | None:
        from jobs.evaluate import parse_ood

        try:
            parse_ood(values or [], option)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        return values

    return check
