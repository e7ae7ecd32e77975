"""`nrm-ood report`: one self-contained HTML page about an audit run that has no OOD labels.

Reads the committed run(s) at ``--scores`` (``<output>/<run-id>`` or an output root: every committed
run under it, via jobs.filtering.read_scores) and shows

* the distribution of ``ood_score`` (higher = more OOD) of the ok rows, with the checkpoint's
  threshold marked (``ood_score > -threshold.value`` is flagged, the same rows as ``is_ood``);
* the OOD rate per predicted class and per source file (tables);
* the most OOD rows (table, with the true label when the input has one), and with ``--input`` (the dataset that was scored, or where it now
  lives) their images next to the model's rendering h(0); the model is the manifest's
  ``model.uri`` unless ``--model`` overrides it;
* error rows grouped by reason;
* on an output root, first the runs over time (jobs/report_history.py): flagged fraction and drift
  distance per run against the in-distribution band, and the latest run's most OOD images beside
  typical ones.

Each input row counts once: when runs under an output root scored the same rows, the newest run's
row is used (and a note says how many were repeated).

PNG figures are embedded as base64 ``data:`` URIs and nothing external is referenced, so the file
opens anywhere. ``report.json`` beside it holds the same tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import figures, manifest, report_history
from jobs.evaluate import GALLERY, error_reasons, extreme_rows, ok_mask
from jobs.filtering import FilterError, read_scores
from jobs.pipeline import Checkpoint, JobError
from jobs.storage import StorageError, Store, absolute


class ReportError(RuntimeError):
    """The report cannot be made; the message is one clear sentence."""


@dataclass
class ReportOptions:
    scores: str
    out: Path  # local directory: report.html, report.json
    _: KW_ONLY
    input: str | None = None
    model: str | None = None
    top: int = 16
    endpoint_url: str | None = None


def committed_manifests(store: Store, scores: str) -> list[dict[str, Any]]:
    """The manifest of the run at ``scores``, or of every committed run under it (as read_scores reads)."""
    base, _, rid = scores.rstrip("/").rpartition("/")
    m = manifest.read(store, base, rid) if base else None
    runs = [m] if m is not None else [r.manifest for r in manifest.committed_runs(store, scores)]
    if not runs:
        raise ReportError(f"no committed run at {scores!r} (expected <output>/<run-id> with a {manifest.MANIFEST}, "
                          "or an output root holding such runs)")
    return runs


# ---------------------------------------------------------------------------- tables (pure)
def rate_table(table: pa.Table, key: str) -> list[dict[str, Any]]:
    """Per value of ``key``: rows, ok, error, flagged OOD and OOD rate (of ok rows), most rows first."""
    keys = table[key].to_pylist()
    ok = ok_mask(table)
    flagged = pc.fill_null(table["is_ood"], False).to_numpy(zero_copy_only=False) & ok
    groups: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        g = groups.setdefault(k, [0, 0, 0])
        g[0] += 1
        g[1] += int(ok[i])
        g[2] += int(flagged[i])
    out = [{key: k, "rows": n, "ok": n_ok, "error": n - n_ok, "flagged_ood": n_ood,
            "ood_rate": n_ood / n_ok if n_ok else None} for k, (n, n_ok, n_ood) in groups.items()]
    return sorted(out, key=lambda r: (-r["rows"], str(r[key])))


def class_table(table: pa.Table, classes: list[str] | None) -> list[dict[str, Any]]:
    """OOD rate per predicted class over the ok rows (error rows have no prediction)."""
    ok = table.filter(pa.array(ok_mask(table)))
    rows = rate_table(ok, "pred")
    for r in rows:
        p = r["pred"]
        r["class"] = classes[p] if classes and p is not None and 0 <= p < len(classes) else str(p)
    return sorted(rows, key=lambda r: (r["pred"] is None, r["pred"] if r["pred"] is not None else 0))


def locate(paths: list[str], files: list[str], scored_input: str | None) -> dict[str, str | None]:
    """Map each scored ``source_path`` to a file of ``--input``: the same URI, else the same path
    relative to the scored input root (the run's ``input``), else the same relative tail / file name."""
    have = set(files)
    root = None
    if scored_input:
        root = absolute(scored_input).rstrip("/")
    out: dict[str, str | None] = {}
    for p in paths:
        if p in have:
            out[p] = p
            continue
        rel = p[len(root) + 1:] if root and p.startswith(root + "/") else os.path.basename(p)
        hits = [f for f in files if f == rel or f.endswith("/" + rel)]
        out[p] = hits[0] if len(hits) == 1 else None
    return out


def newest_rows(table: pa.Table) -> tuple[pa.Table, int]:
    """One row per input row (source_path, source_row): the last one in ``table``, which read_scores
    orders oldest run first, so the newest run's. Returns it and how many older duplicates were dropped."""
    keys = zip(table["source_path"].to_pylist(), table["source_row"].to_pylist(), strict=True)
    last = {k: i for i, k in enumerate(keys)}
    if len(last) == table.num_rows:
        return table, 0
    return table.take(pa.array(sorted(last.values()), pa.int64())), table.num_rows - len(last)


# ---------------------------------------------------------------------------- the report
@dataclass
class Audit:
    """What the report is about: the committed runs, their rows (one per input row) and the model."""

    runs: list[dict[str, Any]]
    table: pa.Table
    model_uri: str
    model_ids: list[str]
    model: Any  # the loaded NRM for renderings, or None
    notes: list[str]


def load_audit(opts: ReportOptions, store: Store) -> Audit:
    try:
        runs = committed_manifests(store, opts.scores)
        table, repeated = newest_rows(read_scores(store, opts.scores))
    except (FilterError, StorageError) as e:
        raise ReportError(str(e)) from None
    model_ids = sorted({r["model"]["model_id"] for r in runs})
    model_uri = opts.model or runs[0]["model"]["uri"]
    notes: list[str] = []
    if repeated:
        notes.append(f"{repeated} rows were scored by more than one run; each input row counts once, with the "
                     "newest run's scores")
    if len(model_ids) > 1:
        notes.append(f"the runs were scored by {len(model_ids)} different models ({', '.join(i[:12] for i in model_ids)}); "
                     "the threshold shown is the first run's")
    model = None
    if opts.input is not None or opts.model is not None:
        try:
            ckpt = Checkpoint.fetch(store, model_uri)
        except JobError as e:
            raise ReportError(str(e)) from None
        model = ckpt.load()
        if ckpt.model_id not in model_ids:
            notes.append(f"renderings use model {ckpt.model_id[:12]} ({model_uri}), which did not score these rows")
    return Audit(runs, table, model_uri, model_ids, model, notes)


def build_report(opts: ReportOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write report.html and report.json for the run(s) at ``opts.scores``; returns report.json's content."""
    if opts.top < 1:
        raise ReportError(f"--top must be >= 1, got {opts.top}")
    store = Store(opts.endpoint_url)
    audit = load_audit(opts, store)
    rep = report_tables(opts, audit)
    body, rep["history"] = report_history.section(store, opts.scores, audit.model, opts.input, min(opts.top, GALLERY))
    body += summary_html(opts, rep)
    body += tables_html(opts, rep, store, audit)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "report.html").write_text(figures.page("NRM OOD audit report", "\n".join(body)))
    (opts.out / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    rows = rep["rows"]
    echo(f"wrote {opts.out / 'report.html'}: {rows['in']} rows, {rows['flagged_ood']} flagged OOD, "
         f"{rows['error']} error rows")
    return rep


def report_tables(opts: ReportOptions, audit: Audit) -> dict[str, Any]:
    """report.json: counts, threshold, OOD rate per class and per file, the most OOD rows, errors."""
    table, runs = audit.table, audit.runs
    ok = ok_mask(table)
    th = runs[0].get("threshold")
    classes = list(audit.model.config.classes) if audit.model is not None else None
    rep: dict[str, Any] = {
        "scores": opts.scores,
        "runs": [r["run_id"] for r in runs],
        "model": {"uri": audit.model_uri, "model_ids": audit.model_ids},
        "threshold": th,
        "ood_score_threshold": -float(th["value"]) if th else None,
        "rows": {"in": table.num_rows, "ok": int(ok.sum()), "error": int(table.num_rows - ok.sum()),
                 "flagged_ood": int(pc.sum(pc.fill_null(table["is_ood"], False)).as_py() or 0)},
        "by_class": class_table(table, classes),
        "by_file": rate_table(table, "source_path"),
        "errors": error_reasons(table, top=50),
        "most_ood": extreme_rows(table, opts.top, most=True),
        "failed_inputs": [f for r in runs for f in r.get("failed_inputs", [])],
        "notes": audit.notes,
    }
    for r in rep["most_ood"]:
        r["class"] = classes[r["pred"]] if classes and r.get("pred") is not None and 0 <= r["pred"] < len(classes) \
            else r.get("pred")
    scores = pc.fill_null(table["ood_score"], np.nan).to_numpy(zero_copy_only=False)[ok]
    rep["_scores"] = scores[np.isfinite(scores)]  # for the histogram; not written to report.json
    return rep


def summary_html(opts: ReportOptions, rep: dict[str, Any]) -> list[str]:
    """The counts, the threshold, notes, unreadable files and the ood_score histogram."""
    rows, th, cut, flagged = rep["rows"], rep["threshold"], rep["ood_score_threshold"], rep["rows"]["flagged_ood"]
    body = [f"<p>{figures.esc(opts.scores)}: run(s) {figures.esc(', '.join(rep['runs']))}; {rows['in']} rows, {rows['ok']} ok, "
            f"{rows['error']} error; <b>{flagged}</b> flagged OOD"
            + (f" ({flagged / rows['ok']:.1%} of ok rows)" if rows["ok"] else "") + ".</p>"]
    if th:
        body.append(f'<p class="note">Threshold: flag OOD when {figures.esc(th["score"])} &lt; {th["value"]:.6g}, i.e. '
                    f"ood_score = -{figures.esc(th['score'])} &gt; {cut:.6g} (fitted to keep {th.get('tpr', 0.95):.0%} of "
                    "held-out in-distribution data).</p>")
    body += [f'<p class="note">Note: {figures.esc(n)}.</p>' for n in rep["notes"]]
    if rep["failed_inputs"]:
        body.append("<h2>Input files that could not be read</h2>"
                    + figures.table(["file", "error"], [[f["uri"], f["error"]] for f in rep["failed_inputs"]]))
    body.append("<h2>Score distribution</h2>")
    scores = rep.pop("_scores")
    if scores.size:
        png = figures.histogram("ood_score of the ok rows", "ood_score (higher = more OOD)", {"ok rows": scores}, cut)
        body.append(figures.img(figures.data_uri(png), "ood_score histogram"))
    else:
        body.append("<p>No ok rows.</p>")
    return body


def tables_html(opts: ReportOptions, rep: dict[str, Any], store: Store, audit: Audit) -> list[str]:
    """OOD rate per class and per file, the most OOD rows (with images when --input is given), errors."""
    body = ["<h2>OOD rate per predicted class</h2>" + figures.table(
        ["class", "pred", "ok rows", "flagged OOD", "OOD rate"],
        [[r["class"], r["pred"], r["ok"], r["flagged_ood"], r["ood_rate"]] for r in rep["by_class"]])]
    body.append("<h2>OOD rate per source file</h2>" + figures.table(
        ["file", "rows", "ok", "error", "flagged OOD", "OOD rate (of ok)"],
        [[r["source_path"], r["rows"], r["ok"], r["error"], r["flagged_ood"], r["ood_rate"]] for r in rep["by_file"]]))
    body.append(f"<h2>Most OOD rows (top {opts.top} by ood_score)</h2>")
    if opts.input is not None and audit.model is not None and rep["most_ood"]:
        body.append(_gallery_html(store, audit.model, rep, opts.input, audit.runs[0]))
    labelled = any(r.get("label") is not None for r in rep["most_ood"])
    body.append(figures.table(["id", "source", "row", "predicted class", *(["label"] if labelled else []), "ood_score"],
                        [[r.get("id"), r["source_path"], r["source_row"], r["class"],
                          *([r.get("label")] if labelled else []), r["ood_score"]] for r in rep["most_ood"]]))
    body.append("<h2>Error rows by reason</h2>" + (
        figures.table(["reason (digits masked as N)", "rows", "example"], [[e["reason"], e["rows"], e["example"]]
                                                                      for e in rep["errors"]]) if rep["errors"]
        else "<p>No error rows.</p>"))
    return body


def _gallery_html(store: Store, model: Any, rep: dict[str, Any], input: str, run: dict[str, Any]) -> str:
    try:
        files = [f.uri for f in store.list_parquet(input)]
    except StorageError as e:
        raise ReportError(f"--input: {e}") from None
    where = locate(sorted({r["source_path"] for r in rep["most_ood"]}), files, run.get("input"))
    refs = [(where.get(r["source_path"]) or r["source_path"], int(r["source_row"])) for r in rep["most_ood"]]
    policy, image_column = figures.read_options(run)
    imgs, renders, errors = figures.render_pairs(store, model, refs, image_column, policy)
    parts = ['<p class="note">Top: the image at the model\'s input size; bottom: its rendering h0 from the '
             "predicted class (de-normalised, min-max scaled). Captions: ood_score, predicted class and, when the "
             "input has one, the true label.</p>"]
    for r, err in zip(rep["most_ood"], errors, strict=True):
        missing = None if where.get(r["source_path"]) else f"{r['source_path']} not found in --input {input}"
        r["image_error"] = missing or err
    classes = list(model.config.classes)
    for start in range(0, len(refs), GALLERY):
        sl = slice(start, start + GALLERY)
        caps = [figures.caption(r, classes, r["image_error"]) for r in rep["most_ood"][sl]]
        png = figures.gallery(f"most OOD {start + 1}-{start + len(caps)}", imgs[sl], renders[sl], caps)
        parts.append(figures.img(figures.data_uri(png), f"most OOD {start + 1}-{start + len(caps)}"))
    return "\n".join(parts)
