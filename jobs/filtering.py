"""`nrm-ood filter`: the in-distribution subset of a scored dataset, and the reader of committed scores."""

from __future__ import annotations

import os
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


def filter_dataset(store: Store, scores: str, input: str, output: str) -> dict[str, Any]:
    table = read_scores(store, scores, ["source_path", "source_row", "status", "is_ood"])
    keep = pc.and_(pc.equal(table["status"], "ok"), pc.invert(pc.fill_null(table["is_ood"], True)))
    by_file: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    paths = table["source_path"].to_numpy(zero_copy_only=False)
    rows = table["source_row"].to_numpy()
    kept_mask = keep.to_numpy(zero_copy_only=False)
    for p in np.unique(paths):
        sel = paths == p
        by_file[str(p)] = (rows[sel], kept_mask[sel])
    try:
        files = store.list_parquet(input)
    except StorageError as e:
        raise FilterError(str(e)) from None
    stats: dict[str, Any] = {
        "rows": 0, "kept": 0, "ood": int(pc.sum(pc.fill_null(table["is_ood"], False)).as_py() or 0),
        "error": int(pc.sum(pc.equal(table["status"], "error")).as_py() or 0), "unscored": 0, "skipped": []}
    out_fs, out_path = store.filesystem(output)
    if not is_s3(output):
        os.makedirs(out_path, exist_ok=True)
    root = os.path.commonpath([f.uri.split("://", 1)[-1] for f in files]) if len(files) > 1 else None
    for f in files:
        scored_rows, scored_keep = by_file.get(f.uri, (np.array([], dtype=np.int64), np.array([], dtype=bool)))
        if len(scored_rows) == 0:  # not covered by these scores (or a failed input): nothing of it is kept
            stats["skipped"].append(f.uri)
            continue
        fs, path = store.filesystem(f.uri)
        t = pq.read_table(path, filesystem=fs)
        stats["rows"] += t.num_rows
        mask = np.zeros(t.num_rows, dtype=bool)
        mask[scored_rows[scored_keep]] = True
        stats["unscored"] += t.num_rows - len(np.unique(scored_rows))
        kept = t.filter(pa.array(mask))
        stats["kept"] += kept.num_rows
        # keep the layout below the input root, so equal basenames in different folders stay apart
        rel = os.path.relpath(f.uri.split("://", 1)[-1], root) if root else os.path.basename(f.uri)
        dest = join(out_path, rel)
        if not is_s3(output):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        pq.write_table(kept, dest, filesystem=out_fs)
    return stats
