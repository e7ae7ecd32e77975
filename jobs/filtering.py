"""`nrm-ood filter`: the in-distribution subset of a scored dataset (on Ray Data, O(rows), nothing per
file on the driver beyond the listing), and the reader of committed scores."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import manifest
from jobs.storage import StorageError, Store, is_s3, join


class FilterError(RuntimeError):
    pass


def committed_outputs(store: Store, scores: str) -> list[str]:
    """Output files of the committed run at ``scores`` (<output>/<run-id>), or of every run under it."""
    base, _, run_id = scores.rstrip("/").rpartition("/")
    m = manifest.read(store, base, run_id) if base else None
    runs = [m] if m is not None else [r.manifest for r in manifest.committed_runs(store, scores)]
    if not runs:
        raise FilterError(f"no committed run at {scores!r} (expected <output>/<run-id> with a {manifest.MANIFEST})")
    return [o["uri"] for r in runs for o in manifest.outputs(store, r)]


def read_scores(store: Store, scores: str, columns: list[str] | None = None) -> pa.Table:
    """Every scored row of the committed run(s) at ``scores`` as one table."""
    tables = []
    for uri in committed_outputs(store, scores):
        fs, path = store.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


STATS = pa.schema([("source_path", pa.string()), ("rows", pa.int64()), ("kept", pa.int64()),
                   ("unscored", pa.int64()), ("written", pa.bool_()), ("ood", pa.int64()), ("error", pa.int64())])


@dataclass(frozen=True)
class FilterSpec:
    store: Store
    output: str
    root: str | None  # common directory of the inputs: the output keeps the layout below it
    listed: frozenset[str]  # input files to write; scores of other files are ignored


def file_masks(group: pa.Table) -> pa.Table:
    """Ray Data map_groups: the scores of one input file -> one row: its scored and kept row numbers."""
    rows = group["source_row"].to_numpy()
    keep = pc.and_(pc.equal(group["status"], "ok"), pc.invert(pc.fill_null(group["is_ood"], True)))
    kept = np.unique(rows[keep.to_numpy(zero_copy_only=False)])
    return pa.table({"source_path": [group["source_path"][0].as_py()], "scored": [len(np.unique(rows))],
                     "kept_rows": [kept.astype(np.int64).tobytes()],
                     "ood": [int(pc.sum(pc.fill_null(group["is_ood"], False)).as_py() or 0)],
                     "error": [int(pc.sum(pc.equal(group["status"], "error")).as_py() or 0)]})


def write_kept(batch: pa.Table, spec: FilterSpec) -> pa.Table:
    """Ray Data task: for each input file, read it, keep its kept rows, write it below ``spec.output``."""
    stats: dict[str, list[Any]] = {k: [] for k in STATS.names}
    for path, scored, kept in zip(batch["source_path"].to_pylist(), batch["scored"].to_pylist(),
                                  batch["kept_rows"].to_pylist(), strict=True):
        written = path in spec.listed
        rows = keep = 0
        if written:
            fs, fpath = spec.store.filesystem(path)
            t = pq.read_table(fpath, filesystem=fs)
            mask = np.zeros(t.num_rows, dtype=bool)
            mask[np.frombuffer(kept, dtype=np.int64)] = True
            out = t.filter(pa.array(mask))
            rows, keep = t.num_rows, out.num_rows
            rel = os.path.relpath(path.split("://", 1)[-1], spec.root) if spec.root else os.path.basename(path)
            out_fs, out_path = spec.store.filesystem(join(spec.output, rel))
            if not is_s3(spec.output):
                os.makedirs(os.path.dirname(out_path), exist_ok=True)
            pq.write_table(out, out_path, filesystem=out_fs)
        for k, v in (("source_path", path), ("rows", rows), ("kept", keep), ("unscored", rows - scored if written else 0),
                     ("written", written)):
            stats[k].append(v)
    return pa.table({**stats, "ood": batch["ood"], "error": batch["error"]}, schema=STATS)


def filter_dataset(store: Store, scores: str, input: str, output: str) -> dict[str, Any]:
    """Write the kept rows (status ok and not is_ood) of every scored input file, on Ray Data: the scores
    are grouped by source file, each file is then read, masked by source row and written by one task."""
    import ray

    from jobs.pipeline import init_ray

    outputs = committed_outputs(store, scores)
    try:
        files = [f.uri for f in store.list_parquet(input)]
    except StorageError as e:
        raise FilterError(str(e)) from None
    init_ray(None)
    fs = store.filesystem(outputs[0])[0]
    ds = ray.data.read_parquet([store.filesystem(u)[1] for u in outputs], filesystem=fs).select_columns(
        ["source_path", "source_row", "status", "is_ood"])
    masks = ds.groupby("source_path").map_groups(file_masks, batch_format="pyarrow")
    root = os.path.commonpath([f.split("://", 1)[-1] for f in files]) if len(files) > 1 else None
    if not is_s3(output):
        os.makedirs(store.filesystem(output)[1], exist_ok=True)
    spec = FilterSpec(store, output, root, frozenset(files))
    per_file = masks.map_batches(write_kept, fn_kwargs={"spec": spec},  # type: ignore[arg-type]
                                 batch_size=16, batch_format="pyarrow", num_cpus=0.5)
    done = pa.Table.from_pylist(per_file.take_all(), schema=STATS)  # one small row per scored file
    written = set(done.filter(done["written"])["source_path"].to_pylist())
    stats: dict[str, Any] = {k: int(pc.sum(done[k]).as_py() or 0) for k in ("rows", "kept", "ood", "error", "unscored")}
    return {**stats, "skipped": [f for f in files if f not in written]}
