"""Options that several commands share (jobs/cli.py, jobs/cli_eval.py): one definition each.

A bounded option is ``at_least``: ``--help`` shows its range and a value outside it is a usage error
(exit 2) that names the value. Nothing here imports torch: ``nrm-ood --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer


def at_least(low: float, help: str, *, strict: bool = False) -> Any:
    """A ``typer.Option`` that refuses values below ``low`` (or equal to it when ``strict``) at parse time,
    naming the value ("must be >= 1, got 0"), and shows the range at the end of its help ("[>= 1]")."""
    sign = ">" if strict else ">="

    def check(value: float | None) -> float | None:
        if value is not None and (value <= low if strict else value < low):
            raise typer.BadParameter(f"must be {sign} {low:g}, got {value:g}")
        return value

    return typer.Option(callback=check, help=f"{help} [{sign} {low:g}]")


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
