"""Committed runs over time: the rows of `nrm-ood runs` and `nrm-ood audit`, their part files, and tidying.

* ``history``: one row per committed run, oldest first: when, rows, errors, flagged fraction against
  the expected rate, the KS distance and the verdict (jobs.drift) under the given limits.
* ``audit``: the latest committed run's row and whether it is an alert.
* ``files``: the part URIs a committed run lists (for any tool that takes a file list).
* ``prune``: for committed runs, remove every file under the run directory that its manifest does not
  name (attempts it did not use: a killed attempt, a resumed attempt's incomplete parts, the temp files
  of a dead write), and write a missing Delta log (jobs.table). Uncommitted runs are never touched:
  their attempts are what ``--resume`` keeps. ``after_commit`` does both for the run just committed,
  best-effort: the commit already happened, so a failure only leaves files for a later ``--prune``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from jobs import drift, manifest, table
from jobs.storage import StorageError, Store, is_s3, join, local_path, split_s3

log = logging.getLogger("nrm_ood")


@dataclass(frozen=True)
class RunRow:
    run_id: str
    created: str
    status: str
    rows: int
    drift: drift.Drift
    verdict: str
    line: str

    def to_json(self) -> dict[str, Any]:
        d = self.drift
        return {"run_id": self.run_id, "created": self.created, "status": self.status, "rows": self.rows,
                "ok": d.ok, "errors": d.errors, "flagged": d.flagged, "flagged_fraction": d.flagged_fraction,
                "expected_rate": d.expected, "flagged_p": d.flagged_p, "ks": d.ks, "ks_p": d.ks_p,
                "score": d.score, "verdict": self.verdict, "line": self.line}


def row(r: manifest.Run, limits: drift.Limits) -> RunRow:
    m = r.manifest
    d = drift.of_manifest(m)
    return RunRow(r.run_id, str(m.get("created", "")), str(m.get("status", "")), int(m.get("rows", {}).get("in", 0)),
                  d, d.verdict(limits), d.line(limits))


def history(store: Store, output: str, limits: drift.Limits) -> list[RunRow]:
    """Every committed run under ``output``, oldest first. Raises StorageError if ``output`` does not exist."""
    return [row(r, limits) for r in manifest.committed_runs(store, output, must_exist=True)]


def audit(store: Store, output: str, limits: drift.Limits, run_id: str | None = None) -> RunRow:
    """The latest committed run's row (or ``run_id``'s). Raises StorageError when there is none."""
    runs = manifest.committed_runs(store, output, must_exist=True)
    if run_id is not None:
        runs = [r for r in runs if r.run_id == run_id]
    if not runs:
        raise StorageError(f"no committed run {run_id} under {output!r}" if run_id else
                           f"no committed run under {output!r}")
    return row(runs[-1], limits)


def files(store: Store, output: str, run_id: str) -> list[str]:
    """The part URIs of the committed run ``run_id``, in the manifest's order."""
    m = manifest.read(store, output, run_id)
    if m is None or m.get("format") != manifest.FORMAT:
        raise StorageError(f"no committed run {run_id!r} under {output!r} (expected {manifest.manifest_uri(output, run_id)})")
    return [str(o["uri"]) for o in manifest.outputs(store, m)]


# ---------------------------------------------------------------------------- tidying
def kept(output: str, run_id: str, m: dict[str, Any], outputs: list[str]) -> set[str]:
    """The URIs under a committed run that stay: the manifest, its lists, its parts and the Delta log."""
    refs = [m[k]["uri"] for k in ("inputs", "outputs", "covered") if isinstance(m.get(k), dict)]
    return {manifest.manifest_uri(output, run_id), table.log_uri(output, run_id), *refs, *outputs}


def unused(store: Store, output: str, run_id: str, m: dict[str, Any]) -> list[str]:
    """Files under the committed run ``run_id`` that its manifest does not name."""
    run_uri = join(output, run_id)
    outputs = [str(o["uri"]) for o in manifest.outputs(store, m)]
    if elsewhere := [u for u in outputs if not u.startswith(run_uri + "/")]:
        raise StorageError(f"run {run_id}: its manifest names {elsewhere[0]}, outside {run_uri} (a moved or copied "
                           "output?); nothing of it was removed")
    keep = kept(output, run_id, m, outputs)
    fs, path = store.filesystem(run_uri)
    listed = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    found = [join(run_uri, i.path[len(path):].lstrip("/")) for i in listed if i.type == pafs.FileType.File]
    return sorted(u for u in found if u not in keep)


def _delete(store: Store, uris: list[str]) -> None:
    """Delete files: S3 keys with DeleteObjects, 1,000 a request (pyarrow's delete_file would leave a
    directory marker behind on S3); local files one by one."""
    keys: dict[str, list[str]] = {}
    for u in uris:
        if is_s3(u):
            bucket, key = split_s3(u)
            keys.setdefault(bucket, []).append(key)
        else:
            os.unlink(local_path(u))
    for bucket, ks in keys.items():
        for i in range(0, len(ks), 1000):
            answer = store.s3().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in ks[i:i + 1000]],
                                                                      "Quiet": True})
            if errors := answer.get("Errors"):
                e = errors[0]
                raise StorageError(f"cannot delete s3://{bucket}/{e.get('Key')}: {e.get('Code')} ({len(errors)} "
                                   "object(s) not deleted)")


def _empty_dirs(store: Store, run_uri: str) -> None:
    """Remove directories left empty under a local run (S3 has no directories)."""
    fs, path = store.filesystem(run_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.Directory]
        for d in sorted(dirs, key=len, reverse=True):
            if not fs.get_file_info(pafs.FileSelector(d)):
                fs.delete_dir(d)


def tidy(store: Store, output: str, run_id: str, m: dict[str, Any]) -> tuple[list[str], bool]:
    """Remove the files the committed run does not use and write its Delta log if missing; returns the
    removed URIs and whether a log was written. Raises StorageError, removing nothing, when the manifest
    names files outside the run directory (the output was moved: every file would look unused)."""
    gone = unused(store, output, run_id, m)
    written = False if table.has_table(store, output, run_id) else table.commit_table(store, output, run_id, m)
    _delete(store, gone)
    _empty_dirs(store, join(output, run_id))
    return gone, written


def prune(store: Store, output: str) -> dict[str, tuple[list[str], bool]]:
    """``tidy`` every committed run under ``output``; {run id: (removed URIs, log written)}."""
    return {r.run_id: tidy(store, output, r.run_id, r.manifest)
            for r in manifest.committed_runs(store, output, must_exist=True)}


def after_commit(store: Store, output: str, run_id: str) -> None:
    """Best-effort ``tidy`` of the run just committed (a failure is logged: ``--prune`` finishes it)."""
    try:
        m = manifest.read(store, output, run_id)
        if m is not None:
            tidy(store, output, run_id, m)
    except Exception as e:
        log.warning("run %s is committed, but its Delta log or the removal of unused attempts failed (%s: %s); "
                    "`nrm-ood runs %s --prune` finishes it", run_id, type(e).__name__, e, output)
