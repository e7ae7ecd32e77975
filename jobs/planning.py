"""Planning a scoring run: every input file's footer read once, in a bounded thread pool, on the driver.

The plan is a list of ``Unit`` (one Parquet row group, carrying its own columns) grouped into read
tasks of about ``TASK_ROWS`` rows, so thousands of small files make tens of Ray tasks, not thousands.
File-level problems (corrupt, truncated, not Parquet, no usable image column) become failed inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.images import Columns, detect_columns
from jobs.storage import FileInfo, Store

# Footers are small reads dominated by latency (S3: one ranged GET each), so threads overlap them well;
# bounded so 100,000 files never mean 100,000 threads or connections (storage.py's client pool is 32).
FOOTER_THREADS = 16
FOOTER_CHUNK = 1024  # footers in flight at once
# A read task takes whole row groups until it holds about this many rows (or MAX_TASK_UNITS of them):
# large row groups stay one task each, small files are batched.
TASK_ROWS = 4096
FOOTER_READ = 64 * 1024  # bytes read from a file's end; a longer footer costs a second read
MAX_TASK_UNITS = 128


@dataclass(frozen=True)
class Unit:
    """One row group of one input file, and where its columns are: everything a read task needs."""

    uri: str
    row_group: int
    row_start: int
    num_rows: int
    columns: Columns
    size: int = 0  # bytes of the whole file (from the listing): small S3 files are read with one GET


@dataclass
class Plan:
    units: list[Unit] = field(default_factory=list)
    inputs: list[tuple[FileInfo, int]] = field(default_factory=list)  # readable files and their rows
    failed: list[dict[str, str]] = field(default_factory=list)  # {"uri", "error"}

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.inputs)


def read_footer(store: Store, uri: str) -> pq.FileMetaData:
    """The Parquet footer of ``uri`` from its tail: on S3 one ranged GET (two if the footer is large)."""
    tail = store.read_tail(uri, FOOTER_READ)
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError(f"not a Parquet file ({len(tail)} bytes read, no PAR1 magic at the end)")
    n = int.from_bytes(tail[-8:-4], "little") + 8
    if n > len(tail):
        tail = store.read_tail(uri, n)
        if n > len(tail):
            raise ValueError(f"footer of {n} bytes is longer than the file ({len(tail)} bytes)")
    # "PAR1" + footer + length + "PAR1" is the smallest valid file holding this footer
    return pq.ParquetFile(pa.BufferReader(b"PAR1" + tail[-n:])).metadata


@dataclass(frozen=True)
class Footer:
    """What planning needs of a footer; the rest (row-group statistics, ...) is dropped in the reading thread."""

    schema: pa.Schema
    row_groups: tuple[int, ...]  # rows per row group

    @property
    def num_rows(self) -> int:
        return sum(self.row_groups)


def footers(store: Store, files: list[FileInfo]) -> Iterator[tuple[FileInfo, Footer | str]]:
    """(file, footer or error text) for every file, in order, read FOOTER_THREADS at a time; submitted a
    chunk at a time so that finished footers never pile up in memory ahead of the consumer."""
    def one(f: FileInfo) -> Footer | str:
        try:
            meta = read_footer(store, f.uri)
            return Footer(meta.schema.to_arrow_schema(),
                          tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
        except Exception as e:  # corrupt, truncated, not parquet, vanished
            return f"cannot read Parquet footer: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(FOOTER_THREADS, thread_name_prefix="footer") as pool:
        for i in range(0, len(files), FOOTER_CHUNK):
            chunk = files[i:i + FOOTER_CHUNK]
            yield from zip(chunk, pool.map(one, chunk), strict=True)


def plan_inputs(store: Store, files: list[FileInfo], image: str | None, id: str | None, label: str | None) -> Plan:
    """Read every file's footer: row groups, schema, image column. File-level problems are recorded."""
    plan = Plan()
    first: str | None = None
    detected: dict[pa.Schema, Columns | str] = {}  # one detection per distinct schema, not per file
    for f, meta in footers(store, files):
        if isinstance(meta, str):
            plan.failed.append({"uri": f.uri, "error": meta})
            continue
        if meta.schema not in detected:
            try:
                detected[meta.schema] = detect_columns(meta.schema, image, id, label)
            except ValueError as e:
                detected[meta.schema] = str(e)
        cols = detected[meta.schema]
        if isinstance(cols, str):
            plan.failed.append({"uri": f.uri, "error": cols + (f" (schema differs from the first input {first})"
                                                               if first is not None else "")})
            continue
        first = first or f.uri
        start = 0
        for rg, n in enumerate(meta.row_groups):
            if n:
                plan.units.append(Unit(f.uri, rg, start, n, cols, f.size))
            start += n
        plan.inputs.append((f, meta.num_rows))
    return plan


def read_tasks(units: list[Unit]) -> list[list[Unit]]:
    """Units grouped into read tasks of about TASK_ROWS rows (or MAX_TASK_UNITS units), in order."""
    tasks: list[list[Unit]] = []
    rows = 0
    for u in units:
        if not tasks or rows + u.num_rows > TASK_ROWS or len(tasks[-1]) >= MAX_TASK_UNITS:
            tasks.append([])
            rows = 0
        tasks[-1].append(u)
        rows += u.num_rows
    return tasks
