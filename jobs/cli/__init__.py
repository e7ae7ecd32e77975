"""The ``nrm-ood`` command line (Typer). Thin: parse, call jobs/nrm, print, exit with a code.

One module per command group, each a Typer app merged into ``app``: ``train`` (train, average),
``detector`` (fit-detector), ``score`` (score, filter), ``runs`` (runs, audit), ``demo``, ``bench``,
``evaluate`` (evaluate, report), ``convert``; ``options`` holds what they share (``fail``, bounded options,
choices drawn from nrm.names, the options several commands take).

Exit codes: 0 done; 1 the run cannot proceed (one clear sentence on stderr); 2 bad usage;
3 run committed but incomplete (failed input files, listed in the manifest); 4 another run
committed the same run id first; 5 (audit) the run drifted beyond the limits; 130 interrupted
(Ctrl-C), nothing committed.
"""

from __future__ import annotations

import logging

import typer

from jobs.cli import bench, convert, demo, detector, evaluate, runs, score, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Score image datasets for out-of-distribution samples with the Neural Rendering Model.")
for group in (train, detector, score, runs, demo, bench, evaluate, convert):
    app.add_typer(group.app)


def main() -> None:
    from jobs.allocator import keep_freed_memory

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # batches reuse freed pages instead of faulting fresh ones in (jobs/allocator.py)
    app()
