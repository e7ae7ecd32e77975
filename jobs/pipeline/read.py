"""The read tasks: Parquet row groups read and decoded on CPU, one Ray Data task per planned group.

Input is read per row group (``planning.Unit``) rather than with ``read_parquet``: it keeps each row's
``source_row`` exact and turns a corrupt or truncated file into error rows instead of a failed job.
"""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.images import Policy, decode_column
from jobs.parts import ADAPT_COLUMN
from jobs.planning import Unit, read_tasks
from jobs.storage import Store, is_s3

# A read task reads its units READ_THREADS at a time; an S3 input file of at most WHOLE_FILE_BYTES is
# fetched whole with one GET (small files dominate request counts, not bytes).
READ_THREADS = 8
WHOLE_FILE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ReadSpec:
    store: Store
    shape: tuple[int, int, int]
    policy: Policy


def read_unit(unit: Unit, spec: ReadSpec, data: bytes | None = None) -> dict[str, np.ndarray]:
    """Read one row group (from ``data``, the whole file, when given) and decode its images. Never
    raises for a row: errors go to ``error``; what the adapt policy did to each row goes to ``_adapt``."""
    cols, n, rg = unit.columns, unit.num_rows, unit.row_group
    fs, path = spec.store.filesystem(unit.uri)
    wanted = [c for c in (cols.image, cols.id, cols.label) if c]
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
        errors = [f"cannot read row group {rg} of {unit.uri}: {type(e).__name__}: {' '.join(str(e).split())}"] * n
    rows = np.arange(unit.row_start, unit.row_start + n, dtype=np.int64)
    ids = np.array([f"{unit.uri}#{r}" for r in rows], dtype=object)  # default, and for null ids
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
        "source_path": np.array([unit.uri] * n, dtype=object),
        "source_row": rows,
        "label": labels,
        "has_label": has,
        "error": np.array([e or "" for e in errors], dtype=object),
        "pixels": pixels,  # (n, H, W, C) uint8
        ADAPT_COLUMN: adapt,
    }


def read_file(units: list[Unit], spec: ReadSpec) -> list[dict[str, np.ndarray]]:
    """The units of one file; a small S3 file is fetched whole with one GET (instead of pyarrow's HEAD,
    footer and column GETs per row group); a failed fetch leaves each unit to fail on its own."""
    uri, size = units[0].uri, units[0].size
    data = None
    if is_s3(uri) and 0 < size <= WHOLE_FILE_BYTES:
        try:
            data = spec.store.read_bytes(uri)
        except Exception:
            data = None
    return [read_unit(u, spec, data) for u in units]


def read_items(units: list[Unit]) -> list[dict[str, bytes]]:
    """One Ray Data item per read task: its units, pickled into one binary cell (Ray Data items are
    Arrow rows, which hold no Python objects)."""
    return [{"units": pickle.dumps(task)} for task in read_tasks(units)]


def read_batch(batch: dict[str, np.ndarray], spec: ReadSpec) -> dict[str, np.ndarray]:
    """Ray Data read task: every unit of one ``read_items`` item, concatenated."""
    by_file: dict[str, list[Unit]] = {}
    for item in batch["units"]:
        for u in pickle.loads(item):
            by_file.setdefault(u.uri, []).append(u)
    with ThreadPoolExecutor(READ_THREADS) as pool:  # small files: mostly waiting on storage, so a few overlap
        got = [p for file_parts in pool.map(lambda us: read_file(us, spec), by_file.values()) for p in file_parts]
    return got[0] if len(got) == 1 else {k: np.concatenate([p[k] for p in got]) for k in got[0]}
