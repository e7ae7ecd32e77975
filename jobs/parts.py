"""Scored part files: the one writer of scored tables, and resume from what earlier attempts wrote.

A part holds up to ``rows_per_file`` scored rows (Ray Data bundles the scoring actors' output to that
size before the write task). It appears whole or not at all (local: temp file + rename; S3: one object
on completion), and its name derives from its rows, so a retried write task rewrites the same file.
Its Parquet footer records its counts and how many rows it holds of each input file: the driver learns
the counts from what the write tasks return, and resume reads only footers, never the rows.

Resume: attempts of a run id are taken oldest first; a part is reused only if every input file it holds
rows of is still the same version and complete (its rows over the reused parts equal the file's rows)
and not already done by an earlier attempt's parts. Every row is thus listed exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.drift import bin_counts
from jobs.images import CONVERTED, RESIZED
from jobs.planning import read_footer
from jobs.storage import StorageError, Store, is_s3, join

PART_META = b"nrm_ood.part"
ADAPT_COLUMN = "_adapt"  # internal: what the adapt policy did to the row (images.CONVERTED | RESIZED)
INPUTS = "_inputs.parquet"
OUTPUTS = "_outputs.parquet"
COUNTS = ("rows", "ok", "error", "ood", "converted", "resized")


@dataclass(frozen=True)
class PartSpec:
    store: Store
    attempt_uri: str
    quantiles: tuple[float, ...] | None = None  # the checkpoint's reference quantiles: count scores per bin


def part_info(table: pa.Table, adapt: np.ndarray, quantiles: tuple[float, ...] | None = None) -> dict[str, Any]:
    """A part's counts, its rows per input file and, with ``quantiles``, its ok rows' threshold scores
    counted per reference bin (jobs.drift.bin_counts; "bins")."""
    is_ok = pc.equal(table["status"], "ok")
    ok = int(pc.sum(is_ok).as_py() or 0)
    sources = pc.value_counts(table["source_path"])
    info = {"rows": table.num_rows, "ok": ok, "error": table.num_rows - ok,
            "ood": int(pc.sum(table["is_ood"]).as_py() or 0),
            "converted": int(np.count_nonzero(adapt & CONVERTED)), "resized": int(np.count_nonzero(adapt & RESIZED)),
            "sources": {str(s["values"]): int(s["counts"]) for s in sources.to_pylist()}}
    if quantiles is not None:  # ood_score = -threshold score
        threshold_scores = -table["ood_score"].filter(is_ok).to_numpy(zero_copy_only=False)
        info["bins"] = bin_counts(threshold_scores, quantiles)
    return info


def write_part(batch: pa.Table, spec: PartSpec) -> dict[str, list[Any]]:
    """Ray Data write task: write one part file; return its uri and counts (one row)."""
    adapt = batch[ADAPT_COLUMN].to_numpy()
    table = batch.drop_columns([ADAPT_COLUMN])
    info = part_info(table, adapt, spec.quantiles)
    h = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
    h.update(table["source_row"].to_numpy().tobytes())
    h.update(str(table["source_path"][0]).encode())
    uri = join(spec.attempt_uri, f"part-{h.hexdigest()[:24]}.parquet")
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), PART_META: json.dumps(info).encode()})
    fs, path = spec.store.filesystem(uri)
    if is_s3(uri):  # an S3 object becomes visible only when its upload completes
        pq.write_table(table, path, filesystem=fs)
    else:
        tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)  # a racing winner's tidy may have removed it
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return {"uri": [uri], **{k: [info[k]] for k in COUNTS}, "bins": [info.get("bins")]}


# ---------------------------------------------------------------------------- resume
@dataclass
class Reuse:
    """What earlier attempts of this run id completed: reusable parts and the input files they cover."""

    parts: list[dict[str, Any]] = field(default_factory=list)  # {"uri", *COUNTS, "bins"}
    done: set[str] = field(default_factory=set)  # input uris

    @property
    def rows(self) -> int:
        return sum(p["rows"] for p in self.parts)


def attempts(store: Store, run_uri: str) -> list[str]:
    """Attempt directories of a run, oldest first (their names start with a UTC time stamp)."""
    return [join(run_uri, d) for d in store.list_dirs(run_uri) if d.startswith("attempt-")]


def _footer_info(store: Store, uri: str) -> dict[str, Any] | None:
    try:
        meta = read_footer(store, uri).schema.to_arrow_schema().metadata or {}
        return {"uri": uri, **json.loads(meta[PART_META])}
    except Exception:  # not a part this code wrote, or unreadable: not reusable
        return None


def scan_attempt(store: Store, attempt_uri: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """An attempt's input versions (from its _inputs.parquet) and its complete parts (footers, in parallel)."""
    fs, path = store.filesystem(attempt_uri)
    try:
        listed = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        data = store.read_bytes(join(attempt_uri, INPUTS))
    except (FileNotFoundError, OSError, StorageError):
        return {}, []  # killed before its plan was written: nothing to reuse
    versions = {r["uri"]: r["version"] for r in pq.read_table(pa.BufferReader(data)).to_pylist() if r["error"] is None}
    files = [i for i in listed if i.type == pafs.FileType.File and i.base_name.startswith("part-")
             and i.base_name.endswith(".parquet")]
    uris = [join(attempt_uri, i.base_name) for i in files]
    with ThreadPoolExecutor(16) as pool:
        infos = list(pool.map(lambda u: _footer_info(store, u), uris))
    return versions, [i for i in infos if i is not None]


def reusable(store: Store, run_uri: str, current: dict[str, tuple[str, int]]) -> Reuse:
    """Parts of earlier attempts that can stand in the new attempt's output; ``current`` maps each input
    uri of this attempt's plan to (version, rows)."""
    reuse = Reuse()
    for attempt in attempts(store, run_uri):
        versions, parts = scan_attempt(store, attempt)
        same = {u for u, v in versions.items() if u in current and current[u][0] == v and u not in reuse.done}
        kept = [p for p in parts if set(p["sources"]) <= same]
        while True:  # drop parts holding rows of an incomplete file until every kept file is complete
            counts: Counter[str] = Counter()
            for p in kept:
                counts.update(p["sources"])
            complete = {u for u, n in counts.items() if n == current[u][1]}
            still = [p for p in kept if set(p["sources"]) <= complete]
            if len(still) == len(kept):
                break
            kept = still
        reuse.parts += [{k: p.get(k) for k in ("uri", *COUNTS, "bins")} for p in kept]
        reuse.done |= complete
    return reuse
