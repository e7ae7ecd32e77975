"""Where a run's time goes: seconds per pipeline stage, the scorer's busy fraction, and what bounds it.

Each stage's seconds are measured where the stage runs (read tasks, scoring actors, write tasks) with
``perf_counter`` and travel with the rows as internal columns ``_t_<stage>``: a batch's seconds are
spread evenly over its rows (:func:`spread`), so however Ray Data re-batches the rows between
stages, the sum over any set of rows is that set's share, and the write tasks' sums (:func:`totals`)
add up to the run's. Seconds are work seconds summed over every task and actor, not wall time.

Stages, in the order a row meets them:

* ``read``: Parquet row groups read from storage (a read task);
* ``decode``: images decoded to uint8 pixels (a read task);
* ``load``: a scoring actor starting: torch imported, the checkpoint loaded;
* ``wait``: a scoring actor idle, waiting for its next batch;
* ``h2d``: the batch copied to the actor's device (and normalised there);
* ``score``: the model's passes;
* ``d2h``: the score columns copied back to the host;
* ``build``: the output Arrow table built;
* ``write``: the part file encoded and written (a write task).

The scorer's busy fraction is score / the actors' wall time (actors x the pipeline's wall time, as
the driver measured it): the share of the actors' time spent scoring. The part of that wall time no
actor stage accounts for (an actor not yet started, or done before the pipeline ends) counts as
start-up. ``analyse`` names the bound and what to change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STAGES = ("read", "decode", "load", "wait", "h2d", "score", "d2h", "build", "write")
ACTOR_STAGES = ("load", "wait", "h2d", "score", "d2h", "build")  # a scoring actor's time, start, then batch after batch
PREFIX = "_t_"
BUSY = 0.8  # at or above this busy fraction the scorer is the bound: the rest of the pipeline keeps up


def column(stage: str) -> str:
    """The internal column that carries ``stage``'s seconds per row."""
    return PREFIX + stage


def spread(seconds: float, n: int) -> np.ndarray:
    """``seconds`` of a batch of ``n`` rows as n equal per-row shares (float64)."""
    return np.full(n, seconds / n if n else 0.0)


def totals(table: pa.Table) -> dict[str, float]:
    """Seconds per stage summed over ``table``'s rows (stages it does not carry: 0)."""
    return {s: float(pc.sum(table[column(s)]).as_py() or 0.0) if column(s) in table.column_names else 0.0
            for s in STAGES}





def add(a: dict[str, float], b: dict[str, float] | None) -> dict[str, float]:
    return {s: a.get(s, 0.0) + (b or {}).get(s, 0.0) for s in STAGES}


def analyse(seconds: dict[str, float], actor_wall: float | None = None) -> dict[str, Any]:
    """The manifest's "stages": seconds per stage, the scorer's busy fraction of ``actor_wall`` (the
    actors' wall time; default: the sum of their stages), the bound and its line (e.g. "scorer busy
    31%: decode-bound; raise --read-cpus")."""
    seconds = {s: round(max(0.0, seconds.get(s, 0.0)), 6) for s in STAGES}
    timed = sum(seconds[s] for s in ACTOR_STAGES)
    wall = max(timed, actor_wall or 0.0)
    busy = round(min(1.0, seconds["score"] / wall), 3) if wall > 0 else 0.0
    bound, advice = _bound(seconds, busy, wall - timed)
    return {"seconds": seconds, "actor_wall_s": round(wall, 3), "busy": busy, "bound": bound,
            "line": f"scorer busy {busy:.0%}: {bound}; {advice}"}


def _bound(seconds: dict[str, float], busy: float, untimed: float) -> tuple[str, str]:
    """(bound, what to change) for stage ``seconds``, the scorer's ``busy`` fraction and the actors'
    ``untimed`` wall seconds (not yet started, or finished before the pipeline)."""
    if busy >= BUSY:
        return "score-bound", "add scoring actors (or GPUs) to go faster"
    idle = {"input": seconds["wait"], "transfer": seconds["h2d"] + seconds["d2h"], "output": seconds["build"],
            "start": seconds["load"] + untimed}
    worst = max(idle, key=lambda k: idle[k])
    if worst == "start":
        return "start-bound", "starting the pipeline (Ray Data, the actors loading the model) outweighs the scoring: score more rows per run"
    if worst == "transfer":
        return "transfer-bound", "the host-device copies outweigh the scoring: raise --batch-size"
    if worst == "output":
        return "output-bound", "building the output tables outweighs the scoring: ask for fewer --columns"
    if seconds["decode"] >= seconds["read"]:
        return "decode-bound", "raise --read-cpus (or give the cluster more CPUs per scoring actor)"
    return "read-bound", "reading the input outweighs decoding it: raise --read-cpus for more reads in flight"
