"""The scoring actor: loads the network once, scores batches of decoded pixels, returns Arrow tables.

``Scorer`` is the callable class of Ray Data's ``ActorPoolStrategy`` pool; each actor holds its copy
of the checkpoint on its GPU (or CPU). ``output_schema`` is the scored table's schema;
``made_columns`` the model columns a run makes.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from jobs.parts import ADAPT_COLUMN
from jobs.pipeline.batching import FIXED_BATCH, Batching
from jobs.pipeline.checkpoint import CheckpointRef
from jobs.pipeline.options import JobError
from jobs.stages import column, spread

if TYPE_CHECKING:
    from torch import Tensor

    from nrm.config import ModelConfig

# Test-only fault injection (tests/jobs/test_reliability_faults.py): a path to a file holding N; the first
# scoring actor to reach its Nth batch deletes the file and kills its own process, exactly once.
KILL_ACTOR_ENV = "NRM_OOD_TEST_KILL_ACTOR_AT"


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
    """The model columns a run makes, in output order (nrm.plan: every one, or ``wanted`` plus pred
    and the threshold score). Raises JobError naming an unknown column."""
    from nrm.plan import ColumnError, plan_for

    try:
        return list(plan_for(config, wanted).columns)
    except ColumnError as e:
        raise JobError(f"--columns {','.join(e.unknown)}: not a column of this model; expected some of "
                       f"{', '.join(e.known)}") from None


class Scorer:
    """Ray actor: loads the NRM once, scores batches of decoded pixels, returns an Arrow table. It is
    handed the checkpoint by reference (URI and hashes), so a restarted actor loads it as the first did."""

    def __init__(self, checkpoint: CheckpointRef, threads: int, columns: tuple[str, ...] | None = None,
                 precision: str = "fp32", compile: bool = False, batching: Batching | None = None):
        started = time.perf_counter()  # the actor's start: torch imported, the checkpoint loaded, the runner made
        import torch

        from jobs.allocator import keep_freed_memory
        from nrm.runner import Runner

        keep_freed_memory()  # each batch reuses the pages of the batch before (jobs/allocator.py)
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = checkpoint.load(self.device)
        # the fast layout (NHWC except fp32 on CUDA, docs/benchmarks.md); compiles at the first batch of each shape
        self.runner = Runner(self.model, precision=precision, compile=compile)
        self.model_id = checkpoint.model_id
        self.plan = self.model.plan(columns)  # the model columns made, their passes, the threshold column
        self.columns = [c for c in self.plan.columns if c not in ("pred", "latent_prior_layers")]  # float score columns
        self.n_layers = len(self.model.latent_names) if "latent_prior_layers" in self.plan.columns else None
        self.schema = output_schema(self.n_layers, self.columns)
        self.batches = 0
        # rows scored at once: the fixed batch size, or under auto the most that fit the budget (probed now)
        probe = Runner(self.model, precision=precision) if compile else self.runner  # eager: no compile per probe shape
        self.rows = (batching or Batching(FIXED_BATCH)).rows_at_once(probe, self.plan)
        self._sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)  # before a clock is read
        self._idle_since = time.perf_counter()  # the end of the last batch (or of loading): the wait starts
        self._load = self._idle_since - started  # reported with the first batch
        self._pin: Tensor | None = None  # CUDA only: page-locked staging for the uint8 batches (_pinned)

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
        """Score the batch's decodable rows; every row comes back, a row that cannot be scored as an
        error row. Its stage seconds (jobs.stages) ride along as internal columns to the write task."""
        t0 = time.perf_counter()
        wait = t0 - self._idle_since
        self._fault_injection_hook()
        n = len(batch["id"])
        error = np.asarray(batch["error"], dtype=object).copy()
        ok = error == ""
        out: dict[str, np.ndarray] = {c: np.full(n, np.nan) for c in self.columns}
        pred = np.full(n, -1, dtype=np.int64)
        layers = np.full((n, self.n_layers or 0), np.nan)
        times = {"h2d": 0.0, "score": 0.0, "d2h": 0.0}
        if ok.any():
            try:
                cols, unscored, why = self._score_rows(batch["pixels"][ok], times)
                if unscored.all():  # not one row fit: all are error rows (below)
                    raise MemoryError(why)
                lost = np.flatnonzero(ok)[unscored]  # rows that alone ran out of memory
                error[lost], ok[lost] = f"scoring failed: {why}", False
                for c in self.columns:
                    out[c][ok] = cols[c]
                pred[ok] = cols["pred"].astype(np.int64)
                if self.n_layers is not None:
                    layers[ok] = cols["latent_prior_layers"]
            except Exception as e:  # a batch the model cannot score: its rows are error rows, the job goes on
                error[ok] = f"scoring failed: {type(e).__name__}: {e}"
                ok[:] = False
        t_build = time.perf_counter()
        table = self._table(batch, ok, error, out, pred, layers)
        times["build"] = time.perf_counter() - t_build
        times["wait"] = wait
        times["load"], self._load = self._load, 0.0
        for stage in ("read", "decode"):  # the read task's seconds, passed through
            if column(stage) in batch:
                table = table.append_column(column(stage), pa.array(batch[column(stage)], pa.float64()))
        for stage, seconds in times.items():
            table = table.append_column(column(stage), pa.array(spread(seconds, n), pa.float64()))
        self._idle_since = time.perf_counter()
        return table

    def _score_rows(self, pixels: np.ndarray, times: dict[str, float]) -> tuple[dict[str, np.ndarray], np.ndarray, str | None]:
        """The score columns of uint8 ``pixels`` (N, H, W, C) as float64 / int64 NumPy for the rows that
        were scored, which rows were not (a row that alone runs out of memory) and why; each stage timed
        into ``times``: h2d (the uint8 copy), score (pieces of ``self.rows``, each normalised on the device
        and halved on running out of memory, nrm.batching; their columns come back to the host inside
        it) and d2h (the columns to NumPy)."""
        from nrm.batching import score_in_pieces

        t = time.perf_counter()
        x = self._to_device(pixels)
        self._sync()
        times["h2d"] = time.perf_counter() - t
        t = time.perf_counter()
        scored = score_in_pieces(self.runner, x, self.plan, self.rows, self.model.preprocess)
        self._sync()
        times["score"] = time.perf_counter() - t
        t = time.perf_counter()
        got = {k: v.double().numpy() if k != "pred" else v.numpy() for k, v in scored.cols.items()}
        times["d2h"] = time.perf_counter() - t
        return got, ~scored.scored.numpy(), scored.error

    def _to_device(self, pixels: np.ndarray) -> Tensor:
        """uint8 pixels (N, H, W, C) on the actor's device: the uint8 batch is what is copied (a quarter
        of float32's bytes); the model's preprocessing runs on the device, piece by piece. On CUDA the
        batch is staged in page-locked memory, so the copy is a non-blocking DMA."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device == "cuda":
            x = self._pinned(x).to(self.device, non_blocking=True)
        return x

    def _pinned(self, x: Tensor) -> Tensor:
        """x copied into the actor's page-locked staging buffer (grown to the largest batch seen). The
        buffer is reused: the copy out of it has finished before the batch's scores come back."""
        import torch

        if self._pin is None or self._pin.shape[0] < len(x) or self._pin.shape[1:] != x.shape[1:]:
            self._pin = torch.empty(x.shape, dtype=x.dtype).pin_memory()
        buf = self._pin[: len(x)]
        buf.copy_(x)
        return buf

    def _table(self, batch: dict[str, np.ndarray], ok: np.ndarray, error: np.ndarray, out: dict[str, np.ndarray],
               pred: np.ndarray, layers: np.ndarray) -> pa.Table:
        """The scored Arrow table, built column by column (no Python loop over rows); rows with a
        non-finite score become error rows."""
        import torch

        n = len(ok)
        finite = np.isfinite(np.stack([out[c] for c in self.columns], 1)).all(1)
        error[ok & ~finite] = "non-finite score (input produced NaN/inf)"
        ok = ok & finite
        ood_score, is_ood = (v.numpy() for v in self.plan.flag({c: torch.from_numpy(v) for c, v in out.items()}))
        null = ~ok
        arrays: dict[str, pa.Array] = {
            "id": pa.array(batch["id"], pa.string()),
            "source_path": pa.array(batch["source_path"], pa.string()),
            "source_row": pa.array(batch["source_row"], pa.int64()),
            "label": pa.array(batch["label"], pa.int64(), mask=~batch["has_label"].astype(bool)),
            "status": pa.array(np.where(ok, "ok", "error"), pa.string()),
            "error": pa.array(error, pa.string(), mask=ok),
            "pred": pa.array(pred, pa.int64(), mask=null),
        }
        for c in self.columns:
            arrays[c] = pa.array(out[c], pa.float64(), mask=null)
        if self.n_layers is not None:
            flat = pa.array(np.where(ok[:, None], layers, 0.0).ravel(), pa.float64())
            offsets = pa.array(np.arange(0, (n + 1) * self.n_layers, self.n_layers), pa.int32())
            arrays["latent_prior_layers"] = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(null))
        arrays["ood_score"] = pa.array(ood_score, pa.float64(), mask=null)
        arrays["is_ood"] = pa.array(is_ood & ok, pa.bool_(), mask=null)
        arrays["model_id"] = pa.repeat(pa.scalar(self.model_id, pa.string()), n)
        table = pa.Table.from_pydict(arrays, schema=self.schema)
        if ADAPT_COLUMN in batch:  # passed through to the write task, which counts and drops it
            table = table.append_column(ADAPT_COLUMN, pa.array(batch[ADAPT_COLUMN], pa.uint8()))
        return table
