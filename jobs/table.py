"""A committed run as a Delta Lake table: the one writer of ``<output>/<run-id>/_delta_log/``.

A run directory holds its committed parts, parts of attempts it did not use and Parquet side lists, so
no glob of Parquet files reads exactly its rows. A Delta log names them: after the manifest commits a
run, the run directory gets version 0 of a Delta table (``_delta_log/00000000000000000000.json``:
protocol, schema, one ``add`` per committed part, paths relative to the run directory), written
create-if-absent like the manifest. DuckDB (``delta_scan``), Polars (``read_delta``), pandas (through
``deltalake``) and Spark (``format("delta")``) then read exactly the committed rows, wherever the
parts lie and whatever else the directory holds.

The manifest stays the commit: the log is derived from it, only by the driver that committed it, so a
Delta reader never sees a run the manifest did not commit. A driver that dies between the two leaves a
committed run without a log; ``nrm-ood runs OUTPUT --prune`` writes it (the same actions).
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs

from jobs import manifest
from jobs.planning import read_footer
from jobs.storage import AlreadyCommitted, StorageError, Store, join

LOG_DIR = "_delta_log"
VERSION_0 = "00000000000000000000.json"


class TableError(StorageError):
    """A run that cannot be described as a Delta table; the message says which and why."""


def log_uri(output: str, run_id: str) -> str:
    return join(output, run_id, LOG_DIR, VERSION_0)


def delta_type(t: pa.DataType) -> Any:
    """The Delta Lake schema type of an Arrow type of a scored table (strings, integers, floats, booleans,
    lists of those)."""
    simple = {pa.string(): "string", pa.large_string(): "string", pa.int64(): "long", pa.int32(): "integer",
              pa.float64(): "double", pa.float32(): "float", pa.bool_(): "boolean"}
    if t in simple:
        return simple[t]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return {"type": "array", "elementType": delta_type(t.value_type), "containsNull": True}
    raise TableError(f"Arrow type {t} has no Delta Lake type here; expected strings, integers, floats, booleans "
                     "or lists of those")


def schema_string(schema: pa.Schema) -> str:
    fields = [{"name": f.name, "type": delta_type(f.type), "nullable": True, "metadata": {}} for f in schema]
    return json.dumps({"type": "struct", "fields": fields})


def _file_infos(store: Store, uris: list[str]) -> dict[str, pafs.FileInfo]:
    """Size and modification time of each part: one listing per attempt directory, not one request per part."""
    out: dict[str, pafs.FileInfo] = {}
    for d in sorted({u.rsplit("/", 1)[0] for u in uris}):
        fs, path = store.filesystem(d)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            out[join(d, info.base_name)] = info
    return out


def actions(store: Store, output: str, run_id: str, m: dict[str, Any]) -> list[dict[str, Any]]:
    """The Delta actions of version 0 for the committed run ``run_id`` whose manifest is ``m``."""
    run_uri = join(output, run_id)
    outs = manifest.outputs(store, m)
    uris = [str(o["uri"]) for o in outs]
    if outside := [u for u in uris if not u.startswith(run_uri + "/")]:
        raise TableError(f"run {run_id}: part {outside[0]} lies outside {run_uri}; a Delta table holds only its own files")
    infos = _file_infos(store, uris)
    if missing := [u for u in uris if u not in infos]:
        raise TableError(f"run {run_id}: committed part {missing[0]} is missing; the run was altered")
    schema = read_footer(store, uris[0]).schema.to_arrow_schema() if uris else pa.schema([])
    created = int(infos[uris[0]].mtime_ns // 1_000_000) if uris else 0
    table_id = str(uuid.uuid5(uuid.NAMESPACE_URL, manifest.manifest_uri(output, run_id)))
    out: list[dict[str, Any]] = [
        {"commitInfo": {"timestamp": created, "operation": "WRITE", "operationParameters": {"mode": "ErrorIfExists"},
                        "engineInfo": f"nrm-ood {m.get('versions', {}).get('nrm_ood', '')}".strip(),
                        "nrmOodRunId": run_id}},
        {"protocol": {"minReaderVersion": 1, "minWriterVersion": 2}},
        {"metaData": {"id": table_id, "format": {"provider": "parquet", "options": {}},
                      "schemaString": schema_string(schema), "partitionColumns": [], "createdTime": created,
                      "configuration": {}}},
    ]
    for o in outs:
        info = infos[str(o["uri"])]
        out.append({"add": {"path": quote(str(o["uri"])[len(run_uri) + 1:]), "partitionValues": {},
                            "size": int(info.size), "modificationTime": int(info.mtime_ns // 1_000_000),
                            "dataChange": True, "stats": json.dumps({"numRecords": int(o["rows"])})}})
    return out


def commit_table(store: Store, output: str, run_id: str, m: dict[str, Any]) -> bool:
    """Write version 0 of the run's Delta log, create-if-absent; False when it is there already."""
    body = "".join(json.dumps(a, separators=(",", ":")) + "\n" for a in actions(store, output, run_id, m))
    try:
        store.put_if_absent(log_uri(output, run_id), body.encode(), content_type="application/json")
    except AlreadyCommitted:
        return False
    return True


def has_table(store: Store, output: str, run_id: str) -> bool:
    return VERSION_0 in store.list_names(join(output, run_id, LOG_DIR))
