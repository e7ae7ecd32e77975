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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import drift, manifest, parts, runs
from jobs.images import Columns, Policy, decode_column
from jobs.parts import ADAPT_COLUMN
from jobs.planning import Plan, Unit, plan_inputs, read_tasks
from jobs.storage import AlreadyCommitted, FileInfo, StorageError, Store, absolute, is_s3, join
from nrm import scores as nrm_scores
from nrm.config import ModelConfig
from nrm.model import PRECISIONS

log = logging.getLogger("nrm_ood")

# The output's float score columns of the public contract, in nrm.scores.COLUMNS order (pred is an
# int64 column, latent_prior_layers a list of one value per layer); fitted det_* / post-hoc columns follow.
SCORE_COLUMNS = ["pred", *(c for c in nrm_scores.COLUMNS if c not in ("pred", "latent_prior_layers"))]

# Fault tolerance, set here rather than left to Ray Data's defaults (which retry forever): a read task whose
# worker dies is rerun; a scoring actor whose process dies is restarted and its in-flight batches are redone
# (a retried write task rewrites its own file name; tests/jobs/test_reliability_faults.py reads back no
# duplicate id). Bounded, so a batch that kills every process it touches fails the run instead of looping.
READ_TASK_RETRIES = 4
ACTOR_RESTARTS = 4
ACTOR_TASK_RETRIES = 4
# A read task reads its units READ_THREADS at a time; an S3 input file of at most WHOLE_FILE_BYTES is
# fetched whole with one GET (small files dominate request counts, not bytes).
READ_THREADS = 8
WHOLE_FILE_BYTES = 8 * 1024 * 1024
# Test-only fault injection (tests/jobs/test_reliability_faults.py): a path to a file holding N; the first
# scoring actor to reach its Nth batch deletes the file and kills its own process, exactly once.
KILL_ACTOR_ENV = "NRM_OOD_TEST_KILL_ACTOR_AT"


class JobError(RuntimeError):
    """The run as a whole cannot proceed; the message is one clear sentence."""


# ---------------------------------------------------------------------------- checkpoint
@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's files in memory, so actors on any node can load it without shared storage."""

    uri: str
    files: dict[str, bytes]
    model_id: str
    config: ModelConfig | None = None  # parsed and validated by fetch

    @property
    def config_sha256(self) -> str:
        """sha256 of config.json: the fitted state (threshold, detector, ...) that model_id, a hash of
        the weights alone, does not cover."""
        from nrm.checkpoint import CONFIG

        return hashlib.sha256(self.files[CONFIG]).hexdigest()

    @classmethod
    def fetch(cls, store: Store, uri: str) -> Checkpoint:
        import nrm
        from nrm.checkpoint import CONFIG, WEIGHTS

        files = {}
        for name in (CONFIG, WEIGHTS):
            try:
                files[name] = store.read_bytes(join(uri, name))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise JobError(f"checkpoint {uri!r} has no {name} (expected a directory or prefix holding "
                               f"{CONFIG} and {WEIGHTS})") from None
            except StorageError as e:
                raise JobError(f"cannot read checkpoint {uri!r}: {e}") from None
        ck = cls(uri, files, "")
        with ck.local() as path:
            try:
                mid = nrm.model_id(path)
                config = nrm.load(path).config  # validates config, shapes, finiteness and the hash, before any work
            except nrm.CheckpointError as e:
                raise JobError(str(e).replace(str(path), uri)) from None
        return cls(uri, files, mid, config)

    def local(self) -> _LocalDir:
        return _LocalDir(self.files)


class _LocalDir:
    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def __enter__(self) -> str:
        self.tmp = tempfile.TemporaryDirectory(prefix="nrm-ckpt-")
        for name, data in self.files.items():
            with open(os.path.join(self.tmp.name, name), "wb") as f:
                f.write(data)
        return self.tmp.name

    def __exit__(self, *exc: object) -> None:
        self.tmp.cleanup()


# ---------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class ReadSpec:
    store: Store
    shape: tuple[int, int, int]
    policy: Policy


def read_unit(unit: dict[str, Any], spec: ReadSpec, data: bytes | None = None) -> dict[str, np.ndarray]:
    """Read one row group (a planning.Unit as a dict; from ``data``, the whole file, when given) and decode
    its images. Never raises for a row: errors go to ``error``; what the adapt policy did to each row goes
    to ``_adapt``."""
    uri, rg, start = str(unit["uri"]), int(unit["row_group"]), int(unit["row_start"])
    cols = Columns(unit["image"], unit["kind"], unit["id"], unit["label"])
    fs, path = spec.store.filesystem(uri)
    wanted = [c for c in (cols.image, cols.id, cols.label) if c]
    n = int(unit["num_rows"])
    adapt = np.zeros(n, dtype=np.uint8)
    try:
        if data is not None:
            table = pq.ParquetFile(pa.BufferReader(data)).read_row_group(rg, columns=wanted)
        else:
            with fs.open_input_file(path) as fh:
                table = pq.ParquetFile(fh).read_row_group(rg, columns=wanted)
        pixels, errors = decode_column(table.column(cols.image), cols.kind, spec.shape, spec.policy, adapt)
    except Exception as e:  # the whole row group is unreadable: every row of it is an error row
        c, h, w = spec.shape
        table = None
        pixels = np.zeros((n, h, w, c), dtype=np.uint8)
        errors = [f"cannot read row group {rg} of {uri}: {type(e).__name__}: {' '.join(str(e).split())}"] * n
    rows = np.arange(start, start + n, dtype=np.int64)
    ids = np.array([f"{uri}#{r}" for r in rows], dtype=object)  # default, and for null ids
    if table is not None and cols.id:
        ids = np.array([d if v is None else str(v) for v, d in zip(table.column(cols.id).to_pylist(), ids, strict=True)],
                       dtype=object)
    labels, has = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
    if table is not None and cols.label:
        vals = table.column(cols.label).to_pylist()
        has = np.array([v is not None for v in vals], dtype=bool)
        labels = np.array([v if v is not None else -1 for v in vals], dtype=np.int64)
    return {
        "id": ids,
        "source_path": np.array([uri] * n, dtype=object),
        "source_row": rows,
        "label": labels,
        "has_label": has,
        "error": np.array([e or "" for e in errors], dtype=object),
        "pixels": pixels,  # (n, H, W, C) uint8
        ADAPT_COLUMN: adapt,
    }


def output_schema(n_layers: int | None, columns: list[str]) -> pa.Schema:
    """The scored table: provenance, status, pred, the float score ``columns`` made, the per-layer
    latent prior (when made: ``n_layers`` not None), ood_score, is_ood and model_id."""
    f64 = pa.float64()
    fields = [pa.field("id", pa.string()), pa.field("source_path", pa.string()), pa.field("source_row", pa.int64())]
    fields.append(pa.field("label", pa.int64()))  # null where the input has no label
    fields += [pa.field("status", pa.string()), pa.field("error", pa.string()), pa.field("pred", pa.int64())]
    fields += [pa.field(c, f64) for c in columns]
    if n_layers is not None:
        # a variable-size list (each row holds n_layers values): Polars reads a fixed-size one from a Delta
        # table as an Array that mismatches the table's schema
        fields.append(pa.field("latent_prior_layers", pa.list_(pa.float64())))
    fields += [pa.field("ood_score", f64), pa.field("is_ood", pa.bool_()), pa.field("model_id", pa.string())]
    return pa.schema(fields)


def made_columns(config: ModelConfig, wanted: tuple[str, ...] | None) -> list[str]:
    """The model columns a run makes, in output order: every one (``wanted`` None), else ``wanted`` plus
    pred and the threshold score (is_ood needs it). Raises JobError naming an unknown column."""
    from nrm.model import fitted_columns

    known = [*nrm_scores.COLUMNS, *fitted_columns(config)]
    if wanted is None:
        return known
    if unknown := [c for c in wanted if c not in known]:
        raise JobError(f"--columns {','.join(unknown)}: not a column of this model; expected some of {', '.join(known)}")
    th = config.fitted.threshold
    keep = {*wanted, "pred", th.score if th else "latent_loglik"}
    return [c for c in known if c in keep]


class Scorer:
    """Ray actor: loads the NRM once, scores batches of decoded pixels, returns an Arrow table."""

    def __init__(self, checkpoint: Checkpoint, threads: int, columns: tuple[str, ...] | None = None,
                 precision: str = "fp32", compile: bool = False):
        import torch

        import nrm
        from jobs.allocator import keep_freed_memory

        keep_freed_memory()  # each batch reuses the pages of the batch before (jobs/allocator.py)
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        with checkpoint.local() as path:
            self.model = nrm.load(path, device=self.device, expect_model_id=checkpoint.model_id)
        self.model.set_precision(precision).use_fast_layout()  # NHWC except fp32 on CUDA (docs/benchmarks.md)
        self.model.use_compile(compile)  # compiles at the first batch of each shape
        self.model_id = checkpoint.model_id
        self.threshold = self.model.config.fitted.threshold
        self.made = made_columns(self.model.config, columns)  # the model columns score() is asked for
        self.columns = [c for c in self.made if c not in ("pred", "latent_prior_layers")]  # float score columns
        self.n_layers = len(self.model.latent_names) if "latent_prior_layers" in self.made else None
        self.schema = output_schema(self.n_layers, self.columns)
        self.batches = 0

    def _fault_injection_hook(self) -> None:
        """Test-only (KILL_ACTOR_ENV unset in production): die like an OOM-killed or preempted actor would."""
        path = os.environ.get(KILL_ACTOR_ENV)
        if not path:
            return
        self.batches += 1
        try:
            with open(path) as f:
                if self.batches < int(f.read()):
                    return
            os.unlink(path)  # only one actor can win the unlink: the fault fires once
        except (OSError, ValueError):
            return
        os._exit(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        self._fault_injection_hook()
        n = len(batch["id"])
        error = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in error], dtype=bool)
        out: dict[str, np.ndarray] = {c: np.full(n, np.nan) for c in self.columns}
        pred = np.full(n, -1, dtype=np.int64)
        layers = np.full((n, self.n_layers or 0), np.nan)
        if ok.any():
            try:
                x = self.model.preprocess(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
                cols = {k: v.double().cpu().numpy() for k, v in self.model.score(x, columns=self.made).items()}
                for c in self.columns:
                    out[c][ok] = cols[c]
                pred[ok] = cols["pred"].astype(np.int64)
                if self.n_layers is not None:
                    layers[ok] = cols["latent_prior_layers"]
            except Exception as e:  # a batch the model cannot score: its rows are error rows, the job goes on
                msg = f"scoring failed: {type(e).__name__}: {e}"
                error = [err or msg for err in error]
                ok[:] = False
        finite = np.isfinite(np.stack([out[c] for c in self.columns], 1)).all(1)
        for i in np.flatnonzero(ok & ~finite):
            error[i] = "non-finite score (input produced NaN/inf)"
        ok &= finite
        th_col = self.threshold.score if self.threshold else "latent_loglik"
        ood_score = -out[th_col]  # higher = more OOD
        is_ood = (out[th_col] < self.threshold.value) if self.threshold else np.zeros(n, dtype=bool)
        arrays: dict[str, pa.Array] = {
            "id": pa.array(batch["id"].tolist(), pa.string()),
            "source_path": pa.array(batch["source_path"].tolist(), pa.string()),
            "source_row": pa.array(batch["source_row"], pa.int64()),
        }
        arrays["label"] = pa.array(batch["label"], pa.int64(), mask=~batch["has_label"].astype(bool))
        arrays["status"] = pa.array(np.where(ok, "ok", "error").tolist(), pa.string())
        arrays["error"] = pa.array([None if k else e for k, e in zip(ok, error, strict=True)], pa.string())
        arrays["pred"] = pa.array(pred, pa.int64(), mask=~ok)
        for c in self.columns:
            arrays[c] = pa.array(out[c], pa.float64(), mask=~ok)
        if self.n_layers is not None:
            flat = pa.array(np.where(ok[:, None], layers, 0.0).ravel(), pa.float64())
            offsets = pa.array(np.arange(0, (n + 1) * self.n_layers, self.n_layers), pa.int32())
            arrays["latent_prior_layers"] = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~ok))
        arrays["ood_score"] = pa.array(ood_score, pa.float64(), mask=~ok)
        arrays["is_ood"] = pa.array(is_ood & ok, pa.bool_(), mask=~ok)
        arrays["model_id"] = pa.array([self.model_id] * n, pa.string())
        table = pa.Table.from_pydict(arrays, schema=self.schema)
        if ADAPT_COLUMN in batch:  # passed through to the write task, which counts and drops it
            table = table.append_column(ADAPT_COLUMN, pa.array(batch[ADAPT_COLUMN], pa.uint8()))
        return table


# ---------------------------------------------------------------------------- the run
ROWS_PER_FILE = 50_000  # rows per output part: tens of thousands, so 100,000 small inputs make a few files


@dataclass(frozen=True)
class ScoreOptions:
    model: str
    input: str
    output: str
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
    precision: str = "fp32"  # nrm.model.PRECISIONS
    compile: bool = False  # torch.compile each actor's scoring pass (pays over long jobs: docs/benchmarks.md)


class Interrupted(JobError):
    """Ctrl-C (or SIGTERM turned into KeyboardInterrupt) before the commit."""


@dataclass
class RunResult:
    run_id: str
    status: str  # "complete" | "incomplete" | "already-committed" | "nothing-to-do" | "lost-commit-race"
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_uri: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # plan_s, score_s, commit_s (driver wall time)

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "already-committed": 0, "nothing-to-do": 0, "incomplete": 3,
                "lost-commit-race": 4}[self.status]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def new_attempt() -> str:
    """Attempt directory name; its time stamp orders attempts for resume."""
    return datetime.now(timezone.utc).strftime("attempt-%Y%m%dT%H%M%S%fZ-") + uuid.uuid4().hex[:6]


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


def pool_size(opts: ScoreOptions) -> tuple[int, float, float]:
    """(actors, cpus per actor, gpus per actor) checked against the cluster's resources, so that the
    pool can never take the CPUs the read tasks need (which would hang the job)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if opts.gpus_per_actor > 0 and gpus == 0 and not opts.address:
        raise JobError(f"--gpus-per-actor {opts.gpus_per_actor} asks for GPUs but this Ray cluster has none")
    free = cpus - opts.read_cpus  # room kept for at least one read task
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
                f"{cpus:g} and the read tasks need {opts.read_cpus:g}; lower --actors or --cpus-per-actor")
    return actors, cpa, opts.gpus_per_actor


def checked(opts: ScoreOptions) -> ScoreOptions:
    """The options validated, with a local output made absolute (the manifest records absolute URIs,
    readable from anywhere). Returns a new object: the caller's options are never changed."""
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
    if "/" in run_id or run_id.startswith((".", "_")):
        raise JobError(f"--run-id {run_id!r} must not contain '/' or start with '.' or '_'")
    return replace(opts, output=output, run_id=run_id)


def run_score(opts: ScoreOptions, echo: Any = print) -> RunResult:
    """Score ``opts.input`` with ``opts.model`` into ``<opts.output>/<run id>``; see the module docstring.
    Raises JobError (one sentence) when the run cannot proceed, Interrupted on Ctrl-C."""
    opts = checked(opts)
    assert opts.run_id is not None
    try:
        return _run(opts, Store(opts.endpoint_url), echo)
    except StorageError as e:  # writing an attempt's lists, scanning earlier attempts
        raise JobError(f"{e}; run {opts.run_id} was not committed") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: run {opts.run_id} was not committed (nothing under {opts.output} is output); "
                          f"rerun the same command with --resume {opts.run_id} to keep what was scored") from None


def _run(opts: ScoreOptions, store: Store, echo: Any) -> RunResult:
    run_id = str(opts.run_id)
    existing = _committed(store, opts)
    if existing is not None:
        return existing
    t0 = time.perf_counter()
    ckpt = Checkpoint.fetch(store, opts.model)
    assert ckpt.config is not None
    made_columns(ckpt.config, opts.columns)  # an unknown --columns fails here, before any work
    with ThreadPoolExecutor(1) as pool:  # the inputs are listed and planned while Ray starts (seconds)
        planned = pool.submit(_plan, store, opts)
        init_ray(opts.address)
        prior, plan = planned.result()
    if plan is None:
        return RunResult(run_id, "nothing-to-do")
    if not plan.inputs:
        f = plan.failed[0]
        raise JobError(f"every input file failed ({len(plan.failed)}; first {f['uri']}: {f['error']}); "
                       "nothing was committed")
    run_uri = join(opts.output, run_id)
    reuse = parts.reusable(store, run_uri, {f.uri: (f.version, n) for f, n in plan.inputs})
    attempt_uri = join(run_uri, new_attempt())
    inputs_ref = manifest.write_list(store, join(attempt_uri, parts.INPUTS),
                                     manifest.input_rows(plan.inputs, plan.failed), manifest.INPUT_SCHEMA)
    timings = {"plan_s": time.perf_counter() - t0}
    echo(f"run {run_id}: {len(plan.inputs)} input file(s), {plan.rows} rows, {len(plan.failed)} unreadable file(s); "
         f"model {ckpt.model_id[:12]}" + (f"; resuming: {len(reuse.done)} file(s), {reuse.rows} rows already scored"
                                          if reuse.done else ""))
    t1 = time.perf_counter()
    written = _score(store, opts, ckpt, [u for u in plan.units if u.uri not in reuse.done], attempt_uri)
    timings["score_s"] = time.perf_counter() - t1
    lists = {"inputs": inputs_ref,
             "covered": manifest.write_covered(store, join(attempt_uri, manifest.COVERED), prior,
                                                  [f for f, _ in plan.inputs])}
    return _commit(store, opts, ckpt, plan, reuse.parts + written, lists, attempt_uri, timings)


def _plan(store: Store, opts: ScoreOptions) -> tuple[set[tuple[str, str]], Plan | None]:
    """The (uri, version) pairs committed runs cover, and the plan of the inputs (None: nothing to do)."""
    files, prior = _inputs(store, opts)
    return prior, plan_inputs(store, files, opts.image_column, opts.id_column, opts.label_column) if files else None


def _committed(store: Store, opts: ScoreOptions) -> RunResult | None:
    """The committed run of this run id, if any; for --resume, also checks there is an attempt to resume."""
    run_id = str(opts.run_id)
    try:
        store.check_bucket(opts.output)
        m = manifest.read(store, opts.output, run_id)
        if m is None and opts.resume and not parts.attempts(store, join(opts.output, run_id)):
            raise JobError(f"--resume {run_id}: no earlier attempt of that run under {opts.output}")
    except StorageError as e:
        raise JobError(str(e)) from None
    return None if m is None else RunResult(run_id, "already-committed", m, manifest.manifest_uri(opts.output, run_id))


def _inputs(store: Store, opts: ScoreOptions) -> tuple[list[FileInfo], set[tuple[str, str]]]:
    """The input files to plan (all listed, or with --incremental those no committed run covers) and the
    (uri, version) pairs committed runs cover. A listing or read error fails the run: with an empty
    answer --incremental would score everything again without a word."""
    try:
        files = store.list_parquet(opts.input)
        prior = manifest.covered(store, opts.output)
    except StorageError as e:
        raise JobError(f"{e}; nothing was scored") from None
    if opts.incremental:
        files = [f for f in files if (f.uri, f.version) not in prior]
    return files, prior


def _score(store: Store, opts: ScoreOptions, ckpt: Checkpoint, units: list[Unit], attempt_uri: str
           ) -> list[dict[str, Any]]:
    """Read, score and write ``units`` into ``attempt_uri`` on Ray Data; the written parts' counts."""
    if not units:
        return []
    ds = _dataset(opts, store, ckpt, units, attempt_uri)
    if not is_s3(attempt_uri):
        os.makedirs(store.filesystem(attempt_uri)[1], exist_ok=True)
    try:
        rows = ds.take_all()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # retries exhausted (actor deaths, storage): nothing is committed
        if isinstance(getattr(e, "cause", None), KeyboardInterrupt) or "KeyboardInterrupt" in str(e)[-500:]:
            raise KeyboardInterrupt from None
        raise JobError(f"scoring failed after retries, nothing was committed: {_one_line(e)}; rerun with "
                       f"--resume {opts.run_id} to keep the parts already written") from None
    return sorted(rows, key=lambda r: str(r["uri"]))


def _dataset(opts: ScoreOptions, store: Store, ckpt: Checkpoint, units: list[Unit], attempt_uri: str) -> Any:
    """The lazy Ray Data pipeline: read tasks -> scoring actors -> write tasks (one row per part)."""
    import ray

    init_ray(opts.address)
    actors, cpa, gpa = pool_size(opts)
    cfg = ckpt.config
    assert cfg is not None  # fetch always parses it
    spec = ReadSpec(store, cfg.input.shape, opts.resize_policy)
    tasks = read_tasks(units)
    ds: ray.data.Dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    with warnings.catch_warnings():  # Ray 2.60 takes retry settings only as (deprecated) extra remote args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(_read_batch, fn_kwargs={"spec": spec}, batch_size=1,  # type: ignore[arg-type]
                            batch_format="default", num_cpus=opts.read_cpus, max_retries=READ_TASK_RETRIES)
        ds = ds.map_batches(
            Scorer, fn_constructor_kwargs={"checkpoint": ckpt, "threads": max(1, round(cpa)), "columns": opts.columns,
                                           "precision": opts.precision, "compile": opts.compile},
            batch_size=opts.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpa, num_gpus=gpa or None,
            resources=opts.actor_resources or None, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_TASK_RETRIES,
        )
        th = cfg.fitted.threshold  # drift: each write task counts its scores per reference bin (jobs.drift)
        quantiles = th.reference.quantiles if th is not None and th.reference is not None else None
        spec_out = parts.PartSpec(store, attempt_uri, quantiles)
        return ds.map_batches(parts.write_part, fn_kwargs={"spec": spec_out},  # type: ignore[arg-type]
                              batch_size=opts.rows_per_file, batch_format="pyarrow", num_cpus=WRITE_CPUS,
                              max_retries=READ_TASK_RETRIES)


MAX_LISTED_FAILURES = 100  # failed inputs quoted in the manifest itself; all of them are in its inputs list
WRITE_CPUS = 0.25  # per write task: it only encodes Parquet, and must fit beside the reads and the actors


def _commit(store: Store, opts: ScoreOptions, ckpt: Checkpoint, plan: Plan, written: list[dict[str, Any]],
            lists: dict[str, Any], attempt_uri: str, timings: dict[str, float]) -> RunResult:
    """Check the row accounting, write the output list, then commit the manifest (one conditional put)."""
    run_id = str(opts.run_id)
    totals = {k: sum(int(p[k]) for p in written) for k in parts.COUNTS}
    if totals["ok"] + totals["error"] != plan.rows or totals["rows"] != plan.rows:
        raise JobError(f"row accounting failed: {plan.rows} rows in, {totals['ok']} ok + {totals['error']} error out; "
                       "nothing was committed")
    t = time.perf_counter()
    outputs_ref = manifest.write_list(store, join(attempt_uri, parts.OUTPUTS),
                                      [{k: p[k] for k in manifest.OUTPUT_SCHEMA.names} for p in written],
                                      manifest.OUTPUT_SCHEMA)
    resumed = sum(int(p["rows"]) for p in written if not str(p["uri"]).startswith(attempt_uri + "/"))
    body = _body(opts, ckpt, plan, totals, {**lists, "outputs": outputs_ref}, resumed, timings)
    assert ckpt.config is not None
    body["drift"] = drift.measure(ckpt.config.fitted.threshold, totals["ok"], totals["error"], totals["ood"],
                                  drift.merge_counts([p.get("bins") for p in written])).to_json(drift.Limits())
    try:
        manifest.point(store, opts.output, run_id)
        uri = manifest.commit(store, opts.output, run_id, body)
    except AlreadyCommitted:
        _discard_lost(store, opts, attempt_uri)
        return RunResult(run_id, "lost-commit-race", body)
    except StorageError as e:  # the outcome is unknown, so the attempt stays: unlisted, it is not output
        raise JobError(f"cannot commit run {run_id} ({e}); it is committed only if `nrm-ood runs` lists it") from None
    runs.after_commit(store, opts.output, run_id)  # its Delta log; attempts it does not use are removed
    return RunResult(run_id, body["status"], body, uri, {**timings, "commit_s": time.perf_counter() - t})


def _body(opts: ScoreOptions, ckpt: Checkpoint, plan: Plan, totals: dict[str, int], lists: dict[str, Any],
          resumed: int, timings: dict[str, float]) -> dict[str, Any]:
    cfg = ckpt.config
    assert cfg is not None
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
        "adapted": {"policy": opts.resize_policy.value, "converted": totals["converted"], "resized": totals["resized"]},
        "resumed_rows": resumed,
        "threshold": ({k: v for k, v in cfg.fitted.threshold.to_json().items() if k != "reference"}
                      if cfg.fitted.threshold else None),  # the reference's quantiles stay in the checkpoint
        "columns": made_columns(cfg, opts.columns),  # the model columns this run made (--columns)
        "precision": opts.precision,
        "compiled": opts.compile,
        "timings": {"plan_s": round(timings["plan_s"], 3), "score_s": round(timings["score_s"], 3),
                    "seconds": round(seconds, 3), "images_per_s": round(plan.rows / seconds, 1) if seconds else None},
        "options": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(opts).items()
                    if k not in ("endpoint_url",)},
    }


def _discard_lost(store: Store, opts: ScoreOptions, attempt_uri: str) -> None:
    """Best-effort removal of an attempt that lost the commit race, unless the winner reused its parts
    (or its output list cannot be read: an attempt left behind is not output, a deleted part may be)."""
    try:
        winner = manifest.read(store, opts.output, str(opts.run_id))
        if winner is None or any(o["uri"].startswith(attempt_uri + "/") for o in manifest.outputs(store, winner)):
            return
        store.delete_dir(attempt_uri)
    except Exception as e:
        log.warning("could not remove the uncommitted attempt %s: %s", attempt_uri, _one_line(e))


def _one_line(e: BaseException) -> str:
    """The last non-empty line of an exception's text (Ray wraps the cause in a long traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _read_file(units: list[dict[str, Any]], spec: ReadSpec) -> list[dict[str, np.ndarray]]:
    """The units of one file; a small S3 file is fetched whole with one GET (instead of pyarrow's HEAD,
    footer and column GETs per row group); a failed fetch leaves each unit to fail on its own."""
    uri, size = str(units[0]["uri"]), int(units[0].get("size") or 0)
    data = None
    if is_s3(uri) and 0 < size <= WHOLE_FILE_BYTES:
        try:
            data = spec.store.read_bytes(uri)
        except Exception:
            data = None
    return [read_unit(u, spec, data) for u in units]


def _read_batch(batch: dict[str, np.ndarray], spec: ReadSpec) -> dict[str, np.ndarray]:
    """Ray Data read task: every unit of one planning.read_tasks item, concatenated."""
    by_file: dict[str, list[dict[str, Any]]] = {}
    for item in batch["units"]:
        for u in json.loads(str(item)):
            by_file.setdefault(u["uri"], []).append(u)
    with ThreadPoolExecutor(READ_THREADS) as pool:  # small files: mostly waiting on storage, so a few overlap
        got = [p for file_parts in pool.map(lambda us: _read_file(us, spec), by_file.values()) for p in file_parts]
    return got[0] if len(got) == 1 else {k: np.concatenate([p[k] for p in got]) for k in got[0]}


def summary(result: RunResult) -> str:
    m = result.manifest
    if result.status == "already-committed":
        failed = m.get("input_files", {}).get("failed", len(m.get("failed_inputs", [])))
        how = f"{m['status']}: {failed} input file(s) failed" if m.get("status") == "incomplete" else m.get("status")
        return (f"run {result.run_id} is already committed ({how}; {result.manifest_uri}); nothing to do"
                + ("; score again under a new --run-id to retry the failed inputs" if m.get("status") == "incomplete"
                   else ""))
    if result.status == "nothing-to-do":
        return "every input file is covered by a committed run; nothing to score"
    rows, t, ad = m["rows"], m["timings"], m["adapted"]
    lines = [
        f"run {result.run_id}: {result.status}",
        f"  rows {rows['in']}  ok {rows['ok']}  errors {rows['error']}  flagged OOD {m['flagged_ood']}"
        + (f" ({m['flagged_ood'] / rows['ok']:.1%} of ok)" if rows["ok"] else ""),
        f"  {t['seconds']:.1f} s (plan {t['plan_s']:.1f}, score {t['score_s']:.1f}), {t['images_per_s'] or 0:.0f} images/s"
        + (f"; {m['resumed_rows']} rows kept from an earlier attempt" if m.get("resumed_rows") else ""),
    ]
    if "drift" in m:
        lines.append(f"  drift: {m['drift']['line']}")
    if ad["converted"] or ad["resized"]:
        lines.append(f"  --resize-policy {ad['policy']}: {ad['converted']} row(s) colour-converted, "
                     f"{ad['resized']} resized to the model's input")
    for f in m.get("failed_inputs", []):
        lines.append(f"  failed input {f['uri']}: {f['error']}")
    if m["input_files"]["failed"] > len(m.get("failed_inputs", [])):
        lines.append(f"  ... {m['input_files']['failed']} failed input files in all (listed in {m['inputs']['uri']})")
    if result.status == "lost-commit-race":
        lines.append(f"  another run committed run id {result.run_id} first; this run's output was discarded")
    else:
        lines.append(f"  manifest {result.manifest_uri}")
    return "\n".join(lines)
