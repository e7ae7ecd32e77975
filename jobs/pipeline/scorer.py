"""The scoring actor: loads the network once, scores batches of decoded pixels, returns Arrow tables.

``Scorer`` is the callable class of Ray Data's ``ActorPoolStrategy`` pool; each actor holds its copy
of the checkpoint on its GPU (or CPU). ``output_schema`` is the scored table's schema;
``made_columns`` the model columns a run makes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from jobs.parts import ADAPT_COLUMN
from jobs.pipeline.checkpoint import Checkpoint
from jobs.pipeline.options import JobError

if TYPE_CHECKING:
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
    """Ray actor: loads the NRM once, scores batches of decoded pixels, returns an Arrow table."""

    def __init__(self, checkpoint: Checkpoint, threads: int, columns: tuple[str, ...] | None = None,
                 precision: str = "fp32", compile: bool = False):
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
                cols = {k: v.double().cpu().numpy() for k, v in self.runner.score(x, self.plan).items()}
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
        ood_score, is_ood = (v.numpy() for v in self.plan.flag({c: torch.from_numpy(v) for c, v in out.items()}))
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
