"""The scoring job on Ray Data: plan -> read+decode (CPU tasks) -> score (actor pool) -> write -> commit.

Planning (jobs/planning.py) lists the inputs once and reads their footers in a bounded thread pool.
Input is read per Parquet row group inside Ray Data tasks (``from_items`` of read tasks, each a few
row groups, then ``map_batches``) rather than with ``read_parquet``: it keeps each row's
``source_row`` exact and turns a corrupt or truncated file into a listed failed input instead of a
failed job. Scoring runs in an ``ActorPoolStrategy`` pool: each actor loads the checkpoint once and
holds it on its GPU (or CPU). Write tasks (jobs/parts.py) turn the scored rows into part files of
``rows_per_file`` rows in a fresh attempt directory and return their counts, so the driver never
reads outputs back. The manifest, written last and create-if-absent, is what commits the run; an
uncommitted run is resumed by scoring again under the same run id (``--resume``).

Modules: ``options`` (ScoreOptions, their checks, run ids, the errors), ``checkpoint`` (the
checkpoint fetched once, shipped as bytes), ``read`` (the read tasks), ``scorer`` (the scoring
actor and the output schema), ``run`` (``Run``: the driver's steps, and ``run_score``), ``result``
(RunResult and its summary). Importing this package imports no torch and no Ray.
"""

from jobs.pipeline.checkpoint import Checkpoint
from jobs.pipeline.options import Interrupted, JobError, ScoreOptions, check_run_id
from jobs.pipeline.read import ReadSpec, read_unit
from jobs.pipeline.result import RunResult, summary
from jobs.pipeline.run import Run, init_ray, run_score
from jobs.pipeline.scorer import KILL_ACTOR_ENV, Scorer

__all__ = ["KILL_ACTOR_ENV", "Checkpoint", "Interrupted", "JobError", "ReadSpec", "Run", "RunResult", "ScoreOptions",
           "Scorer", "check_run_id", "init_ray", "read_unit", "run_score", "summary"]
