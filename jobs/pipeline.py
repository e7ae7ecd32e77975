"""The scoring job on Ray Data: plan -> read+decode (CPU tasks) -> score (actor pool) -> write -> commit.

Input is read per Parquet row group inside Ray Data tasks (``from_items`` of row-group units, then
``map_batches``) rather than with ``read_parquet``: it keeps each row's ``source_row`` exact and
turns a corrupt or truncated file into a listed failed input instead of a failed job. Scoring runs in
an ``ActorPoolStrategy`` pool: each actor loads the checkpoint once and holds it on its GPU (or CPU).
Output goes through ``write_parquet`` into a fresh attempt directory; the manifest, written last and
create-if-absent, is what commits it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import manifest
from jobs.images import Columns, Policy, decode_column, detect_columns
from jobs.storage import AlreadyCommitted, FileInfo, StorageError, Store, absolute, is_s3, join
from nrm.config import ModelConfig

log = logging.getLogger("nrm_ood")

SCORE_COLUMNS = ["pred", "max_softmax", "max_logit", "energy", "latent_prior", "latent_loglik",
                 "recon_sq_error", "loglik_bound"]

# Fault tolerance, set here rather than left to Ray Data's defaults (which retry forever): a read task whose
# worker dies is rerun; a scoring actor whose process dies is restarted and its in-flight batches are redone
# (a retried write task rewrites its own file name; tests/jobs/test_reliability_faults.py reads back no
# duplicate id). Bounded, so a batch that kills every process it touches fails the run instead of looping.
READ_TASK_RETRIES = 4
ACTOR_RESTARTS = 4
ACTOR_TASK_RETRIES = 4
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


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Unit:
    """One row group of one input file: the unit of reading."""

    uri: str
    row_group: int
    row_start: int
    num_rows: int


@dataclass
class Plan:
    units: list[Unit] = field(default_factory=list)
    inputs: list[tuple[FileInfo, int]] = field(default_factory=list)  # readable files and their rows
    failed: list[dict[str, str]] = field(default_factory=list)  # {"uri", "error"}
    columns: dict[str, Columns] = field(default_factory=dict)  # per file


def plan_inputs(store: Store, files: list[FileInfo], image: str | None, id: str | None, label: str | None) -> Plan:
    """Read every file's footer: row groups, schema, image column. File-level problems are recorded."""
    plan = Plan()
    first: tuple[str, pa.Schema] | None = None
    for f in files:
        fs, path = store.filesystem(f.uri)
        try:
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:  # corrupt, truncated, not parquet, vanished
            plan.failed.append({"uri": f.uri, "error": f"cannot read Parquet footer: {type(e).__name__}: {e}"})
            continue
        try:
            cols = detect_columns(schema, image, id, label)
        except ValueError as e:
            msg = str(e)
            if first is not None:
                msg += f" (schema differs from the first input {first[0]})"
            plan.failed.append({"uri": f.uri, "error": msg})
            continue
        if first is None:
            first = (f.uri, schema)
        plan.columns[f.uri] = cols
        start = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                plan.units.append(Unit(f.uri, rg, start, n))
            start += n
        plan.inputs.append((f, meta.num_rows))
    return plan


# ---------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class ReadSpec:
    store: Store
    shape: tuple[int, int, int]
    policy: Policy
    columns: dict[str, Columns]


def read_unit(unit: dict[str, Any], spec: ReadSpec) -> dict[str, np.ndarray]:
    """Read one row group and decode its images. Never raises for a row: errors go to ``error``."""
    uri, rg, start = str(unit["uri"]), int(unit["row_group"]), int(unit["row_start"])
    cols = spec.columns[uri]
    fs, path = spec.store.filesystem(uri)
    wanted = [c for c in (cols.image, cols.id, cols.label) if c]
    n = int(unit["num_rows"])
    try:
        with fs.open_input_file(path) as fh:
            table = pq.ParquetFile(fh).read_row_group(rg, columns=wanted)
        pixels, errors = decode_column(table.column(cols.image), cols.kind, spec.shape, spec.policy)
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
    }


def output_schema(n_layers: int, extra: list[str] | None = None) -> pa.Schema:
    f64 = pa.float64()
    fields = [pa.field("id", pa.string()), pa.field("source_path", pa.string()), pa.field("source_row", pa.int64())]
    fields.append(pa.field("label", pa.int64()))  # null where the input has no label
    fields += [pa.field("status", pa.string()), pa.field("error", pa.string()), pa.field("pred", pa.int64())]
    fields += [pa.field(c, f64) for c in [*SCORE_COLUMNS[1:], *(extra or [])]]
    fields += [pa.field("latent_prior_layers", pa.list_(pa.float64(), n_layers)),
               pa.field("ood_score", f64), pa.field("is_ood", pa.bool_()), pa.field("model_id", pa.string())]
    return pa.schema(fields)


class Scorer:
    """Ray actor: loads the NRM once, scores batches of decoded pixels, returns an Arrow table."""

    def __init__(self, checkpoint: Checkpoint, threads: int):
        import torch

        import nrm

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        with checkpoint.local() as path:
            self.model = nrm.load(path, device=self.device, expect_model_id=checkpoint.model_id)
        self.model_id = checkpoint.model_id
        self.threshold = self.model.config.fitted.threshold
        self.columns = [*SCORE_COLUMNS[1:], *self.model.extra_columns]  # float score columns
        self.schema = output_schema(len(self.model.latent_names), self.model.extra_columns)
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
        layers = np.full((n, len(self.model.latent_names)), np.nan)
        if ok.any():
            try:
                x = self.model.preprocess(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
                cols = {k: v.double().cpu().numpy() for k, v in self.model.score(x).items()}
                for c in self.columns:
                    out[c][ok] = cols[c]
                pred[ok] = cols["pred"].astype(np.int64)
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
        for c in SCORE_COLUMNS[1:]:
            arrays[c] = pa.array(out[c], pa.float64(), mask=~ok)
        for c in self.model.extra_columns:
            arrays[c] = pa.array(out[c], pa.float64(), mask=~ok)
        flat = pa.array(np.where(ok[:, None], layers, 0.0).ravel(), pa.float64())
        arrays["latent_prior_layers"] = pa.FixedSizeListArray.from_arrays(flat, layers.shape[1], mask=pa.array(~ok))
        arrays["ood_score"] = pa.array(ood_score, pa.float64(), mask=~ok)
        arrays["is_ood"] = pa.array(is_ood & ok, pa.bool_(), mask=~ok)
        arrays["model_id"] = pa.array([self.model_id] * n, pa.string())
        return pa.Table.from_pydict(arrays, schema=self.schema)


# ---------------------------------------------------------------------------- the run
@dataclass
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


@dataclass
class RunResult:
    run_id: str
    status: str  # "complete" | "incomplete" | "already-committed" | "nothing-to-do" | "lost-commit-race"
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_uri: str = ""

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "already-committed": 0, "nothing-to-do": 0, "incomplete": 3,
                "lost-commit-race": 4}[self.status]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


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


def run_score(opts: ScoreOptions, echo: Any = print) -> RunResult:
    """Score ``opts.input`` with ``opts.model`` into ``opts.output``; see the module docstring."""
    import ray

    store = Store(opts.endpoint_url)
    opts.output = absolute(opts.output)  # the manifest records absolute URIs, readable from anywhere
    if opts.batch_size < 1:
        raise JobError(f"--batch-size must be >= 1, got {opts.batch_size}")
    run_id = opts.run_id or new_run_id()
    if "/" in run_id or run_id.startswith((".", "_")):
        raise JobError(f"--run-id {run_id!r} must not contain '/' or start with '.' or '_'")
    try:
        store.check_bucket(opts.output)
        existing = manifest.read(store, opts.output, run_id)
    except StorageError as e:
        raise JobError(str(e)) from None
    if existing is not None:
        return RunResult(run_id, "already-committed", existing, manifest.manifest_uri(opts.output, run_id))
    ckpt = Checkpoint.fetch(store, opts.model)
    cfg = ckpt.config
    assert cfg is not None  # fetch always parses it
    try:
        files = store.list_parquet(opts.input)
    except StorageError as e:
        raise JobError(str(e)) from None
    if opts.incremental:
        done = manifest.covered(manifest.committed_runs(store, opts.output))
        files = [f for f in files if (f.uri, f.version) not in done]
        if not files:
            return RunResult(run_id, "nothing-to-do")
    plan = plan_inputs(store, files, opts.image_column, opts.id_column, opts.label_column)
    rows_in = sum(u.num_rows for u in plan.units)
    echo(f"run {run_id}: {len(plan.inputs)} input file(s), {rows_in} rows, {len(plan.failed)} unreadable file(s); "
         f"model {ckpt.model_id[:12]}")
    attempt = f"attempt-{uuid.uuid4().hex[:8]}"
    attempt_uri = join(opts.output, run_id, attempt)
    t0 = time.perf_counter()
    outputs: list[dict[str, Any]] = []
    counts = {"ok": 0, "error": 0, "ood": 0}
    if plan.units:
        init_ray(opts.address)
        actors, cpa, gpa = pool_size(opts)
        spec = ReadSpec(store, cfg.input.shape, opts.resize_policy, plan.columns)
        ds: ray.data.Dataset = ray.data.from_items([asdict(u) for u in plan.units], override_num_blocks=len(plan.units))
        with warnings.catch_warnings():  # Ray 2.60 takes retry settings only as (deprecated) extra remote args
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(_read_batch, fn_kwargs={"spec": spec}, batch_size=1,  # type: ignore[arg-type]
                                batch_format="default",
                                num_cpus=opts.read_cpus, max_retries=READ_TASK_RETRIES)
            ds = ds.map_batches(
                Scorer, fn_constructor_kwargs={"checkpoint": ckpt, "threads": max(1, round(cpa))},
                batch_size=opts.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpa, num_gpus=gpa or None,
                max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_TASK_RETRIES,
            )
        fs, path = store.filesystem(attempt_uri)
        if not is_s3(attempt_uri):
            os.makedirs(path, exist_ok=True)
        try:
            ds.write_parquet(path, filesystem=fs)
        except Exception as e:  # retries exhausted (actor deaths, storage): this attempt is not output
            _discard(store, attempt_uri)
            raise JobError(f"scoring failed after retries, nothing was committed: {_one_line(e)}") from None
        outputs, counts = _count_outputs(store, attempt_uri)
    seconds = time.perf_counter() - t0
    if counts["ok"] + counts["error"] != rows_in:
        raise JobError(f"row accounting failed: {rows_in} rows in, {counts['ok']} ok + {counts['error']} error out; "
                       "nothing was committed")
    body: dict[str, Any] = {
        "status": "incomplete" if plan.failed else "complete",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"uri": opts.model, "model_id": ckpt.model_id, "config_sha256": ckpt.config_sha256},
        "input": opts.input,
        "inputs": [manifest.input_entry(f, n) for f, n in plan.inputs],
        "failed_inputs": plan.failed,
        "outputs": outputs,
        "rows": {"in": rows_in, "ok": counts["ok"], "error": counts["error"]},
        "flagged_ood": counts["ood"],
        "threshold": asdict(cfg.fitted.threshold) if cfg.fitted.threshold else None,
        "timings": {"seconds": round(seconds, 3), "images_per_s": round(rows_in / seconds, 1) if seconds else None},
        "options": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(opts).items()
                    if k not in ("endpoint_url",)},
    }
    try:
        uri = manifest.commit(store, opts.output, run_id, body)
    except AlreadyCommitted:
        _discard(store, attempt_uri)
        return RunResult(run_id, "lost-commit-race", body)
    except StorageError as e:  # the outcome is unknown, so the attempt stays: unlisted, it is not output
        raise JobError(f"cannot commit run {run_id} ({e}); it is committed only if `nrm-ood runs` lists it") from None
    return RunResult(run_id, body["status"], body, uri)


def _discard(store: Store, attempt_uri: str) -> None:
    """Best-effort removal of an attempt that will never be committed (unlisted, it is not output anyway)."""
    try:
        store.delete_dir(attempt_uri)
    except Exception as e:
        log.warning("could not remove the uncommitted attempt %s: %s", attempt_uri, _one_line(e))


def _one_line(e: BaseException) -> str:
    """The last non-empty line of an exception's text (Ray wraps the cause in a long traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _read_batch(batch: dict[str, np.ndarray], spec: ReadSpec) -> dict[str, np.ndarray]:
    parts = [read_unit({k: v[i] for k, v in batch.items()}, spec) for i in range(len(batch["uri"]))]
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _count_outputs(store: Store, attempt_uri: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    fs, path = store.filesystem(attempt_uri)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    outputs, counts = [], {"ok": 0, "error": 0, "ood": 0}
    prefix = attempt_uri.rstrip("/")
    for info in sorted((i for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")),
                       key=lambda i: i.path):
        t = pq.read_table(info.path, filesystem=fs, columns=["status", "is_ood"])
        ok = int(pa.compute.sum(pa.compute.equal(t["status"], "ok")).as_py() or 0)
        counts["ok"] += ok
        counts["error"] += t.num_rows - ok
        counts["ood"] += int(pa.compute.sum(t["is_ood"]).as_py() or 0)
        rel = info.path[len(path):].lstrip("/")
        outputs.append({"uri": join(prefix, rel), "rows": t.num_rows})
    return outputs, counts


def summary(result: RunResult) -> str:
    m = result.manifest
    if result.status == "already-committed":
        return f"run {result.run_id} is already committed ({result.manifest_uri}); nothing to do"
    if result.status == "nothing-to-do":
        return "every input file is covered by a committed run; nothing to score"
    rows, t = m["rows"], m["timings"]
    lines = [
        f"run {result.run_id}: {result.status}",
        f"  rows {rows['in']}  ok {rows['ok']}  errors {rows['error']}  flagged OOD {m['flagged_ood']}"
        + (f" ({m['flagged_ood'] / rows['ok']:.1%} of ok)" if rows["ok"] else ""),
        f"  {t['seconds']:.1f} s, {t['images_per_s'] or 0:.0f} images/s",
    ]
    for f in m.get("failed_inputs", []):
        lines.append(f"  failed input {f['uri']}: {f['error']}")
    if result.status == "lost-commit-race":
        lines.append(f"  another run committed run id {result.run_id} first; this run's output was discarded")
    else:
        lines.append(f"  manifest {result.manifest_uri}")
    return "\n".join(lines)
