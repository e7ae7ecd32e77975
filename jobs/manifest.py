"""Run manifests: the one writer of ``<output>/<run-id>/_manifest.json`` and the readers of it.

A run is committed when its manifest exists; the manifest is written last, create-if-absent (S3
conditional put / local hard link), so a run id commits at most once. Everything else under the
run directory that the manifest does not list (an interrupted or losing attempt) is not output.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from typing import Any

from jobs.storage import FileInfo, StorageError, Store, join

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


def committed_runs(store: Store, output: str) -> list[Run]:
    """Every committed run under ``output``, oldest first by creation time."""
    runs = []
    try:
        names = store.list_dirs(output)
    except StorageError:
        return []
    for name in names:
        m = read(store, output, name)
        if m is not None and m.get("format") == FORMAT:
            runs.append(Run(name, m))
    return sorted(runs, key=lambda r: (r.manifest.get("created", ""), r.run_id))


def covered(runs: list[Run]) -> set[tuple[str, str]]:
    """(uri, version) of every input file that a committed run scored completely."""
    return {(i["uri"], i["version"]) for r in runs for i in r.manifest.get("inputs", [])}


def input_entry(f: FileInfo, rows: int) -> dict[str, Any]:
    return {"uri": f.uri, "size": f.size, "version": f.version, "rows": rows}
