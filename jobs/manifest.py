"""Run manifests: the one writer of ``<output>/<run-id>/_manifest.json`` and the readers of it.

A run is committed when its manifest exists; the manifest is written last, create-if-absent (S3
conditional put / local hard link), so a run id commits at most once. Everything else under the
run directory that the manifest does not list (an interrupted or losing attempt) is not output.

The manifest stays a few KiB at any scale: the input and output file lists are Parquet files beside
the run's outputs (``_inputs.parquet``, ``_outputs.parquet`` in the attempt directory), each named in
the manifest with its sha256 and row count; ``inputs()`` and ``outputs()`` read them back, checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.storage import AlreadyCommitted, FileInfo, StorageError, Store, join

MANIFEST = "_manifest.json"
FORMAT = "nrm-run-manifest"


def manifest_uri(output: str, run_id: str) -> str:
    return join(output, run_id, MANIFEST)


def versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch

    from jobs import __version__

    return {"nrm_ood": __version__, "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version()}


def commit(store: Store, output: str, run_id: str, body: dict[str, Any]) -> str:
    """Write the manifest; raises storage.AlreadyCommitted if this run id is committed already."""
    uri = manifest_uri(output, run_id)
    doc = {"format": FORMAT, "version": 1, "run_id": run_id, **body, "versions": versions()}
    store.put_if_absent(uri, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode())
    return uri


def read(store: Store, output: str, run_id: str) -> dict[str, Any] | None:
    try:
        return store.read_json(manifest_uri(output, run_id))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


@dataclass
class Run:
    run_id: str
    manifest: dict[str, Any]


def committed_runs(store: Store, output: str, must_exist: bool = False) -> list[Run]:
    """Every committed run under ``output``, oldest first by creation time. Raises StorageError if
    ``output`` cannot be listed, or (``must_exist``) does not exist: an empty answer would hide it."""
    names = store.list_dirs(output, must_exist=must_exist)
    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(lambda n: read(store, output, n), names))
    runs = [Run(n, m) for n, m in zip(names, found, strict=True) if m is not None and m.get("format") == FORMAT]
    return sorted(runs, key=lambda r: (r.manifest.get("created", ""), r.run_id))


# ---------------------------------------------------------------------------- file lists beside the manifest
INPUT_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                          ("rows", pa.int64()), ("error", pa.string())])  # error: null for a readable file
OUTPUT_SCHEMA = pa.schema([("uri", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("error", pa.int64()),
                           ("ood", pa.int64()), ("converted", pa.int64()), ("resized", pa.int64())])


def input_rows(inputs: list[tuple[FileInfo, int]], failed: list[dict[str, str]]) -> list[dict[str, Any]]:
    return ([{"uri": f.uri, "size": f.size, "version": f.version, "rows": n, "error": None} for f, n in inputs]
            + [{"uri": f["uri"], "size": None, "version": None, "rows": None, "error": f["error"]} for f in failed])


def write_list(store: Store, uri: str, rows: list[dict[str, Any]], schema: pa.Schema) -> dict[str, Any]:
    """Write ``rows`` as one Parquet object at ``uri`` (create-if-absent); its reference for the manifest."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    data = sink.getvalue().to_pybytes()
    store.put_if_absent(uri, data, content_type="application/vnd.apache.parquet")
    return {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "count": len(rows)}


def read_list(store: Store, ref: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a list the manifest names, after checking its sha256 (a changed list is an error).
    A manifest written before the lists moved beside it holds the list inline: it is returned as is."""
    if isinstance(ref, list):
        return ref
    data = store.read_bytes(ref["uri"])
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise StorageError(f"{ref['uri']} does not match the sha256 its manifest records; the run was altered")
    return pq.read_table(pa.BufferReader(data)).to_pylist()  # type: ignore[no-any-return,unused-ignore]


def inputs(store: Store, m: dict[str, Any]) -> list[dict[str, Any]]:
    """Every readable input file of a committed run: {"uri", "size", "version", "rows"}."""
    return [{k: v for k, v in r.items() if k != "error"} for r in read_list(store, m["inputs"]) if r.get("error") is None]


def outputs(store: Store, m: dict[str, Any]) -> list[dict[str, Any]]:
    """Every output file of a committed run: {"uri", "rows", "ok", "error", "ood", "converted", "resized"}."""
    return read_list(store, m["outputs"])


# ---------------------------------------------------------------------------- incremental: what is covered
# Each run writes, beside its outputs, the cumulative list of (uri, version) of every input file it or an
# earlier committed run scored (``_covered.parquet``, named and hashed in its manifest as "covered"), and
# just before its commit a pointer ``<output>/_index/<UTC time>--<run id>``. --incremental then costs one
# listing of _index (1,000 runs a request), the newest committed manifest and its covered list: in
# proportion to the files, never to the number of runs. Two incremental runs committing at once both
# build on the same earlier list, so the next run may score one run's files again: never fewer.
INDEX = "_index"
COVERED = "_covered.parquet"
COVERED_SCHEMA = pa.schema([("uri", pa.string()), ("version", pa.string())])


def latest_committed(store: Store, output: str) -> Run | None:
    """The committed run whose index pointer is newest; None when no run under ``output`` wrote one."""
    for name in sorted(store.list_names(join(output, INDEX)), reverse=True):
        run_id = name.partition("--")[2]
        m = read(store, output, run_id) if run_id else None
        if m is not None and m.get("format") == FORMAT:
            return Run(run_id, m)
    return None


def covered(store: Store, output: str) -> set[tuple[str, str]]:
    """(uri, version) of every input file that a committed run under ``output`` scored completely.
    A missing output means nothing is covered yet; a listing or read error raises StorageError."""
    latest = latest_committed(store, output)
    if latest is None:  # no run wrote an index pointer: only manifests older than it, with inline inputs
        return {(i["uri"], i["version"]) for r in committed_runs(store, output)
                if isinstance(r.manifest.get("inputs"), list) for i in r.manifest["inputs"]}
    return {(r["uri"], r["version"]) for r in read_list(store, latest.manifest["covered"])}


def write_covered(store: Store, uri: str, prior: set[tuple[str, str]], files: list[FileInfo]) -> dict[str, Any]:
    rows = sorted(prior | {(f.uri, f.version) for f in files})
    return write_list(store, uri, [{"uri": u, "version": v} for u, v in rows], COVERED_SCHEMA)


def point(store: Store, output: str, run_id: str) -> None:
    """The index pointer of a run about to commit (a pointer to a run that never commits is skipped)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    with contextlib.suppress(AlreadyCommitted):
        store.put_if_absent(join(output, INDEX, f"{stamp}--{run_id}"), b"", content_type="text/plain")
