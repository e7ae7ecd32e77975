"""One scoring run on the driver: plan -> read+decode (CPU tasks) -> score (actor pool) -> write -> commit.

``Run`` holds what the run's steps share: the store, the checked options and run id, the fetched
checkpoint, the attempt directory and the timings. ``run_score`` is the entry point.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from jobs import drift, manifest, parts, runs, stages
from jobs.images import Target
from jobs.pipeline.batching import Batching, batching
from jobs.pipeline.checkpoint import Checkpoint
from jobs.pipeline.options import Interrupted, JobError, ScoreOptions, checked
from jobs.pipeline.read import ReadSpec, read_batch, read_items
from jobs.pipeline.result import RunResult
from jobs.pipeline.scorer import Scorer, made_columns
from jobs.planning import Plan, Unit, plan_inputs
from jobs.storage import AlreadyCommitted, StorageError, Store, is_s3, join

log = logging.getLogger("nrm_ood")
Echo = Callable[[str], None]

# Fault tolerance, set here rather than left to Ray Data's defaults (which retry forever): a read task whose
# worker dies is rerun; a scoring actor whose process dies is restarted and its in-flight batches are redone
# (a retried write task rewrites its own file name; tests/jobs/test_reliability_faults.py reads back no
# duplicate id). Bounded, so a batch that kills every process it touches fails the run instead of looping.
READ_TASK_RETRIES = 4
ACTOR_RESTARTS = 4
ACTOR_TASK_RETRIES = 4
WRITE_CPUS = 0.25  # per write task: it only encodes Parquet, and must fit beside the reads and the actors
MAX_LISTED_FAILURES = 100  # failed inputs quoted in the manifest itself; all of them are in its inputs list


def run_score(opts: ScoreOptions, echo: Echo = print) -> RunResult:
    """Score ``opts.input`` with ``opts.model`` into ``<opts.output>/<run id>``; see jobs.pipeline.
    Raises JobError (one sentence) when the run cannot proceed, Interrupted on Ctrl-C."""
    opts, run_id = checked(opts)
    store = Store(opts.endpoint_url)
    try:
        existing = committed_run(store, opts, run_id)
        if existing is not None:
            return existing
        return Run(store, opts, run_id, echo).execute()
    except StorageError as e:  # writing an attempt's lists, scanning earlier attempts
        raise JobError(f"{e}; run {run_id} was not committed") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: run {run_id} was not committed (nothing under {opts.output} is output); "
                          f"rerun the same command with --resume {run_id} to keep what was scored") from None


def committed_run(store: Store, opts: ScoreOptions, run_id: str) -> RunResult | None:
    """The committed run of this run id, if any; for --resume, also checks there is an attempt to resume."""
    try:
        store.check_bucket(opts.output)
        m = manifest.read(store, opts.output, run_id)
        if m is None and opts.resume and not parts.attempts(store, join(opts.output, run_id)):
            raise JobError(f"--resume {run_id}: no earlier attempt of that run under {opts.output}")
    except StorageError as e:
        raise JobError(str(e)) from None
    return None if m is None else RunResult(run_id, "already-committed", m, manifest.manifest_uri(opts.output, run_id))


def new_attempt() -> str:
    """Attempt directory name; its time stamp orders attempts for resume."""
    return datetime.now(timezone.utc).strftime("attempt-%Y%m%dT%H%M%S%fZ-") + uuid.uuid4().hex[:6]


class Run:
    """One attempt at committing run ``run_id``: its steps (plan, score, commit) and what they share.
    Made with the checked options; fetches and validates the checkpoint first, before any other work."""

    def __init__(self, store: Store, opts: ScoreOptions, run_id: str, echo: Echo) -> None:
        self.started = time.perf_counter()  # plan_s counts from here: the checkpoint's fetch is part of it
        self.store, self.opts, self.run_id, self.echo = store, opts, run_id, echo
        self.checkpoint = Checkpoint.fetch(store, opts.model)
        self.columns = made_columns(self.checkpoint.config, opts.columns)  # an unknown --columns fails here
        self.run_uri = join(opts.output, run_id)
        self.attempt_uri = join(self.run_uri, new_attempt())
        self.timings: dict[str, float] = {}  # plan_s, score_s, commit_s (driver wall time)
        self.ray_data: dict[str, dict[str, float]] = {}  # Ray Data's own stats per operator (ray_data_stats)
        self.pool: Pool | None = None  # set when the pipeline is built
        self.precision = opts.precision  # the one the actors use ("auto" resolved when the pipeline is built)

    def execute(self) -> RunResult:
        """Plan, score what no earlier attempt completed, and commit."""
        prior, plan = self.plan()
        if plan is None:
            return RunResult(self.run_id, "nothing-to-do")
        if not plan.inputs:
            f = plan.failed[0]
            raise JobError(f"every input file failed ({len(plan.failed)}; first {f['uri']}: {f['error']}); "
                           "nothing was committed")
        reuse = parts.reusable(self.store, self.run_uri, {f.uri: (f.version, n) for f, n in plan.inputs})
        inputs_ref = manifest.write_list(self.store, join(self.attempt_uri, parts.INPUTS),
                                         manifest.input_rows(plan.inputs, plan.failed), manifest.INPUT_SCHEMA)
        self.timings["plan_s"] = time.perf_counter() - self.started
        self.echo(f"run {self.run_id}: {len(plan.inputs)} input file(s), {plan.rows} rows, {len(plan.failed)} "
                  f"unreadable file(s); model {self.checkpoint.model_id[:12]}"
                  + (f"; resuming: {len(reuse.done)} file(s), {reuse.rows} rows already scored" if reuse.done else ""))
        t1 = time.perf_counter()
        written = self.score([u for u in plan.units if u.uri not in reuse.done])
        self.timings["score_s"] = time.perf_counter() - t1
        lists = {"inputs": inputs_ref,
                 "covered": manifest.write_covered(self.store, join(self.attempt_uri, manifest.COVERED), prior,
                                                   [f for f, _ in plan.inputs])}
        return self.commit(plan, reuse.parts + written, lists)

    # ------------------------------------------------------------------------ plan
    def plan(self) -> tuple[set[tuple[str, str]], Plan | None]:
        """The (uri, version) pairs committed runs cover, and the plan of the inputs (None: nothing to
        do), made while Ray starts (seconds)."""
        with ThreadPoolExecutor(1) as pool:
            planned = pool.submit(self._plan_inputs)
            init_ray(self.opts.address)
            return planned.result()

    def _plan_inputs(self) -> tuple[set[tuple[str, str]], Plan | None]:
        """Lists the input files (all, or with --incremental those no committed run covers) and reads
        their footers. A listing or read error fails the run: with an empty answer --incremental would
        score everything again without a word."""
        opts = self.opts
        try:
            files = self.store.list_parquet(opts.input)
            prior = manifest.covered(self.store, opts.output)
        except StorageError as e:
            raise JobError(f"{e}; nothing was scored") from None
        if opts.incremental:
            files = [f for f in files if (f.uri, f.version) not in prior]
        if not files:
            return prior, None
        return prior, plan_inputs(self.store, files, opts.image_column, opts.id_column, opts.label_column)

    # ------------------------------------------------------------------------ score
    def score(self, units: list[Unit]) -> list[dict[str, Any]]:
        """Read, score and write ``units`` into the attempt directory on Ray Data; the written parts' counts."""
        if not units:
            return []
        ds = self.dataset(units)
        if not is_s3(self.attempt_uri):
            os.makedirs(self.store.filesystem(self.attempt_uri)[1], exist_ok=True)
        try:
            done = ds.materialize()  # a few rows (one per part written); keeps Ray Data's execution stats
            rows = done.take_all()
            self.ray_data = ray_data_stats(done.stats())
        except KeyboardInterrupt:
            raise
        except Exception as e:  # retries exhausted (actor deaths, storage): nothing is committed
            if isinstance(getattr(e, "cause", None), KeyboardInterrupt) or "KeyboardInterrupt" in str(e)[-500:]:
                raise KeyboardInterrupt from None
            raise JobError(f"scoring failed after retries, nothing was committed: {one_line(e)}; rerun with "
                           f"--resume {self.run_id} to keep the parts already written") from None
        return sorted(rows, key=lambda r: str(r["uri"]))

    def dataset(self, units: list[Unit]) -> Any:
        """The lazy Ray Data pipeline: read tasks -> scoring actors -> write tasks (one row per part)."""
        import ray

        opts = self.opts
        init_ray(opts.address)
        pool = self.pool = pool_size(opts)
        self.precision = run_precision(opts, pool)
        spec = ReadSpec(self.store, Target.of(self.checkpoint.config.input, opts.decode), opts.resize_policy,
                        pool.decode_threads)
        items = read_items(units)
        ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
        with warnings.catch_warnings():  # Ray 2.60 takes retry settings only as (deprecated) extra remote args
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(read_batch, fn_kwargs={"spec": spec}, batch_size=1,  # type: ignore[arg-type]
                                batch_format="default", num_cpus=pool.read_cpus, max_retries=READ_TASK_RETRIES)
            ds = ds.map_batches(
                Scorer, fn_constructor_kwargs=self.scorer_args(pool),
                batch_size=self.batching(pool).rows, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus_per_actor,
                num_gpus=pool.gpus_per_actor or None,
                resources=opts.actor_resources or None, max_restarts=ACTOR_RESTARTS,
                max_task_retries=ACTOR_TASK_RETRIES,
            )
            th = self.checkpoint.config.fitted.threshold  # drift: each write task counts its scores per reference bin
            quantiles = th.reference.quantiles if th is not None and th.reference is not None else None
            spec_out = parts.PartSpec(self.store, self.attempt_uri, quantiles)
            return ds.map_batches(parts.write_part, fn_kwargs={"spec": spec_out},  # type: ignore[arg-type]
                                  batch_size=opts.rows_per_file, batch_format="pyarrow", num_cpus=WRITE_CPUS,
                                  max_retries=READ_TASK_RETRIES)

    def scorer_args(self, pool: Pool) -> dict[str, Any]:
        """The scoring actors' constructor arguments: what survives an actor's restart (the checkpoint by
        URI and hashes, never its bytes, loaded once per node) and plain options."""
        return {"checkpoint": self.checkpoint.ref(self.store), "threads": max(1, round(pool.cpus_per_actor)),
                "columns": self.opts.columns, "precision": self.precision, "compile": self.opts.compile,
                "batching": self.batching(pool)}

    def batching(self, pool: Pool) -> Batching:
        """Ray Data's batch (rows, or under --batch-size auto a byte size of pixels) and what each actor
        probes its pieces against (jobs/pipeline/batching.py)."""
        opts = self.opts
        return batching(opts.batch_size, opts.memory_budget, self.checkpoint.config.input.shape, pool.cpus_per_actor,
                        pool.gpus_per_actor)

    # ------------------------------------------------------------------------ commit
    def commit(self, plan: Plan, written: list[dict[str, Any]], lists: dict[str, Any]) -> RunResult:
        """Check the row accounting, write the output list, then commit the manifest (one conditional put)."""
        totals = {k: sum(int(p[k]) for p in written) for k in parts.COUNTS}
        if totals["ok"] + totals["error"] != plan.rows or totals["rows"] != plan.rows:
            raise JobError(f"row accounting failed: {plan.rows} rows in, {totals['ok']} ok + {totals['error']} error "
                           "out; nothing was committed")
        t = time.perf_counter()
        outputs_ref = manifest.write_list(self.store, join(self.attempt_uri, parts.OUTPUTS),
                                          [{k: p[k] for k in manifest.OUTPUT_SCHEMA.names} for p in written],
                                          manifest.OUTPUT_SCHEMA)
        resumed = sum(int(p["rows"]) for p in written if not str(p["uri"]).startswith(self.attempt_uri + "/"))
        body = self.manifest_body(plan, totals, {**lists, "outputs": outputs_ref}, resumed)
        seconds: dict[str, float] = {}
        for p in written:  # parts reused from an earlier attempt carry no stage seconds of this one
            seconds = stages.add(seconds, p.get("stages"))
        actor_wall = self.pool.actors * self.timings["score_s"] if self.pool else None
        body["stages"] = {**stages.analyse(seconds, actor_wall), "ray_data": self.ray_data,
                          "pool": asdict(self.pool) if self.pool else None}
        body["drift"] = drift.measure(self.checkpoint.config.fitted.threshold, totals["ok"], totals["error"],
                                      totals["ood"], drift.merge_counts([p.get("bins") for p in written])
                                      ).to_json(drift.Limits())
        try:
            manifest.point(self.store, self.opts.output, self.run_id)
            uri = manifest.commit(self.store, self.opts.output, self.run_id, body)
        except AlreadyCommitted:
            self.discard_lost()
            return RunResult(self.run_id, "lost-commit-race", body)
        except StorageError as e:  # the outcome is unknown, so the attempt stays: unlisted, it is not output
            raise JobError(f"cannot commit run {self.run_id} ({e}); it is committed only if `nrm-ood runs` "
                           "lists it") from None
        runs.after_commit(self.store, self.opts.output, self.run_id)  # its Delta log; attempts it does not use are removed
        return RunResult(self.run_id, body["status"], body, uri, {**self.timings, "commit_s": time.perf_counter() - t})

    def manifest_body(self, plan: Plan, totals: dict[str, int], lists: dict[str, Any], resumed: int) -> dict[str, Any]:
        """The run's manifest, less what manifest.commit adds (format, version, run id, versions)."""
        opts, ckpt, timings = self.opts, self.checkpoint, self.timings
        threshold = ckpt.config.fitted.threshold
        seconds = timings["plan_s"] + timings["score_s"]
        return {
            "status": "incomplete" if plan.failed else "complete",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"uri": opts.model, "model_id": ckpt.model_id, "config_sha256": ckpt.config_sha256},
            "input": opts.input,
            **lists,  # {"uri", "sha256", "count"} of the Parquet lists beside the outputs
            "input_files": {"ok": len(plan.inputs), "failed": len(plan.failed)},
            "failed_inputs": plan.failed[:MAX_LISTED_FAILURES],
            "rows": {"in": plan.rows, "ok": totals["ok"], "error": totals["error"]},
            "flagged_ood": totals["ood"],
            "adapted": {"policy": opts.resize_policy.value, "converted": totals["converted"],
                        "resized": totals["resized"]},
            "resumed_rows": resumed,
            "threshold": ({k: v for k, v in threshold.to_json().items() if k != "reference"}
                          if threshold else None),  # the reference's quantiles stay in the checkpoint
            "columns": self.columns,  # the model columns this run made (--columns)
            "precision": self.precision,  # the one used (options.precision keeps what was asked for)
            "compiled": opts.compile,
            "decode": opts.decode,
            "timings": {"plan_s": round(timings["plan_s"], 3), "score_s": round(timings["score_s"], 3),
                        "seconds": round(seconds, 3),
                        "images_per_s": round(plan.rows / seconds, 1) if seconds else None},
            "options": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(opts).items()
                        if k not in ("endpoint_url",)},
        }

    def discard_lost(self) -> None:
        """Best-effort removal of an attempt that lost the commit race, unless the winner reused its parts
        (or its output list cannot be read: an attempt left behind is not output, a deleted part may be)."""
        try:
            winner = manifest.read(self.store, self.opts.output, self.run_id)
            if winner is None or any(o["uri"].startswith(self.attempt_uri + "/")
                                     for o in manifest.outputs(self.store, winner)):
                return
            self.store.delete_dir(self.attempt_uri)
        except Exception as e:
            log.warning("could not remove the uncommitted attempt %s: %s", self.attempt_uri, one_line(e))


# ---------------------------------------------------------------------------- Ray
def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        kw["address"] = address
    elif not os.environ.get("RAY_ADDRESS"):
        kw["include_dashboard"] = False
    ray.init(**kw)


@dataclass(frozen=True)
class Pool:
    """How the run uses the cluster: scoring actors and their CPUs and GPUs, and CPUs per read task."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    read_cpus: float  # per read+decode task, which decodes with as many threads (at least one)

    @property
    def decode_threads(self) -> int:
        return max(1, round(self.read_cpus))


def default_read_cpus(cpus: float, gpus: float, cpus_per_actor: float) -> float:
    """CPUs per read task when --read-cpus is not given. CPU-only: 0.5, so that reads always find room
    beside the actors (on 2 cores an actor pool that takes every CPU starves the reads and the job
    hangs). With GPUs: the CPUs each GPU has beside its actor, in tasks of 1-4 CPUs (at least four
    tasks in flight per GPU, each decoding with as many threads)."""
    if gpus <= 0:
        return 0.5
    spare = cpus / gpus - cpus_per_actor
    return float(max(1, min(4, int(spare // 4))))


def pool_size(opts: ScoreOptions) -> Pool:
    """The pool checked against the cluster's resources, so that it can never take the CPUs the read
    tasks need (which would hang the job)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if opts.gpus_per_actor > 0 and gpus == 0 and not opts.address:
        raise JobError(f"--gpus-per-actor {opts.gpus_per_actor} asks for GPUs but this Ray cluster has none")
    read_cpus = opts.read_cpus if opts.read_cpus is not None else default_read_cpus(cpus, gpus, opts.cpus_per_actor)
    if read_cpus >= cpus and not opts.address:
        raise JobError(f"--read-cpus {read_cpus:g} leaves no CPU of this Ray cluster's {cpus:g} for the scoring actors; "
                       f"expected less than {cpus:g}")
    free = cpus - read_cpus  # room kept for at least one read task
    if opts.actors is None:
        if opts.gpus_per_actor > 0 and gpus > 0:
            actors = max(1, int(gpus / opts.gpus_per_actor))
        else:
            actors = max(1, int(free // opts.cpus_per_actor)) if free >= opts.cpus_per_actor else 1
    else:
        actors = opts.actors
    cpa = opts.cpus_per_actor
    if actors * cpa > free:
        if opts.actors is None:  # shrink the default to fit, fractional CPUs on very small machines
            cpa = max(0.1, free / actors)
        elif not opts.address:
            raise JobError(
                f"--actors {actors} x --cpus-per-actor {cpa} = {actors * cpa:g} CPUs, but this Ray cluster has "
                f"{cpus:g} and the read tasks need {read_cpus:g}; lower --actors or --cpus-per-actor")
    return Pool(actors, cpa, opts.gpus_per_actor, read_cpus)


def device_precision() -> str:
    """The precision "auto" means on this worker's device (a Ray task placed like a scoring actor)."""
    import torch

    from nrm.names import AUTO_PRECISION
    from nrm.precision import resolve

    return resolve(AUTO_PRECISION, "cuda" if torch.cuda.is_available() else "cpu")


def run_precision(opts: ScoreOptions, pool: Pool) -> str:
    """``opts.precision``; "auto" resolved by one task on a worker placed as the actors are (its device)."""
    from nrm.names import AUTO_PRECISION

    if opts.precision != AUTO_PRECISION:
        return opts.precision
    import ray

    probe = ray.remote(device_precision).options(num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None,
                                                 resources=opts.actor_resources or None)
    return str(ray.get(probe.remote()))


OPERATOR = re.compile(r"^Operator \d+ (?P<name>.+?): (?P<tasks>\d+) tasks executed")
REMOTE_WALL = re.compile(r"^\* Remote wall time: .*?(?P<total>[\d.]+)(?P<unit>us|ms|s) total")


def ray_data_stats(text: str) -> dict[str, dict[str, float]]:
    """Ray Data's own per-operator stats, from ``Dataset.stats()`` (its only public form, a text):
    tasks executed and their remote wall time summed (seconds). Empty where the text has neither."""
    found: dict[str, dict[str, float]] = {}
    name = None
    for line in text.splitlines():
        line = line.strip()
        if m := OPERATOR.match(line):
            name = m["name"]
            found[name] = {"tasks": int(m["tasks"])}
        elif name is not None and (m := REMOTE_WALL.match(line)):
            found[name]["remote_wall_s"] = round(float(m["total"]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m["unit"]], 3)
    return found


def one_line(e: BaseException) -> str:
    """The last non-empty line of an exception's text (Ray wraps the cause in a long traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"
