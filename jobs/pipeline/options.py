"""What a scoring run is asked to do (``ScoreOptions``), its checks, its run id, and its errors."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import KW_ONLY, dataclass, replace
from datetime import datetime, timezone

from jobs.images import Policy
from jobs.storage import absolute, is_s3
from nrm.names import PRECISIONS

ROWS_PER_FILE = 50_000  # rows per output part: tens of thousands, so 100,000 small inputs make a few files
# A run id names a folder (local or S3) and the index pointer "<UTC time>--<run id>" beside the runs:
# letters, digits, '.', '_' and '-', starting with a letter or digit, short enough for any file system.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_RUN_ID = 128


class JobError(RuntimeError):
    """The run as a whole cannot proceed; the message is one clear sentence."""


class Interrupted(JobError):
    """Ctrl-C (or SIGTERM turned into KeyboardInterrupt) before the commit."""


@dataclass(frozen=True)
class ScoreOptions:
    model: str
    input: str
    output: str
    _: KW_ONLY  # the rest by name only: a reordered field can never swap two options
    run_id: str | None = None
    actors: int | None = None  # None: one per GPU, else as many as the CPUs allow
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 512
    incremental: bool = False
    address: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    resize_policy: Policy = Policy.adapt
    endpoint_url: str | None = None
    read_cpus: float = 0.5  # per read+decode task: fractional so reads always find room beside the actors
    resume: str | None = None  # a run id whose earlier attempt must exist (the same as --run-id, but checked)
    rows_per_file: int = ROWS_PER_FILE
    actor_resources: dict[str, float] | None = None  # custom Ray resources per scoring actor (pins it to nodes)
    columns: tuple[str, ...] | None = None  # None: the full table; else these (plus pred and the threshold score)
    precision: str = "fp32"  # nrm.names.PRECISIONS
    compile: bool = False  # torch.compile each actor's scoring pass (pays over long jobs: docs/benchmarks.md)


def check_run_id(value: str) -> str:
    """``value`` if it can name a run; else ValueError, one sentence that quotes it (the callers prefix
    the option: ``--run-id`` or ``--resume``)."""
    if len(value) > MAX_RUN_ID:
        raise ValueError(f"{value[:40]!r}... is {len(value)} characters long; expected at most {MAX_RUN_ID} letters, "
                         "digits, '.', '_' or '-'")
    if not RUN_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a run id (it must not contain '/' or start with '.' or '_'): expected "
                         "letters, digits, '.', '_' or '-', the first a letter or digit")
    return value


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def checked(opts: ScoreOptions) -> tuple[ScoreOptions, str]:
    """The options validated, with a local output made absolute (the manifest records absolute URIs,
    readable from anywhere) and the run id set, and that run id. The caller's options are never changed."""
    output = absolute(opts.output)
    if not is_s3(output) and os.path.exists(output) and not os.path.isdir(output):
        raise JobError(f"--output {opts.output!r} is an existing file; expected a directory (or s3:// prefix) "
                       "to hold the runs")
    if opts.batch_size < 1:
        raise JobError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.rows_per_file < 1:
        raise JobError(f"--rows-per-file must be >= 1, got {opts.rows_per_file}")
    if opts.precision not in PRECISIONS:
        raise JobError(f"--precision {opts.precision!r}: expected one of {', '.join(PRECISIONS)}")
    if opts.resume and opts.run_id and opts.resume != opts.run_id:
        raise JobError(f"--resume {opts.resume!r} and --run-id {opts.run_id!r} name different runs; give one")
    run_id = opts.resume or opts.run_id or new_run_id()
    try:
        check_run_id(run_id)
    except ValueError as e:
        raise JobError(f"{'--resume' if opts.resume else '--run-id'} {e}") from None
    return replace(opts, output=output, run_id=run_id), run_id
