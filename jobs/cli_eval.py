"""`nrm-ood evaluate` and `nrm-ood report` (registered on the main Typer app by ``register``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to ``app``."""
