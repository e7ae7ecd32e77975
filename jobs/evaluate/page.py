"""report.html of `nrm-ood evaluate`: the tables, score histograms, ROC curves, AUROC by layer and
galleries of the most and least OOD rows, each PNG saved under figures/ and embedded in the page."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import figures
from jobs.evaluate.metrics import (
    CONVENTION,
    METRICS,
    build_metrics,
    group_note,
    group_rows,
    key_scores,
    metrics_markdown,
    score_columns,
    score_label,
)
from jobs.evaluate.sets import IN, ScoredSet
from jobs.storage import Store
from nrm.metrics import orient

GALLERY = 8  # images per gallery strip


class FigureFiles:
    """The PNG figures of one report: each saved under ``figures/`` and embedded in the page as a
    ``data:`` URI, so report.html opens on its own (like `nrm-ood report`'s)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.written: dict[str, list[str]] = {"histograms": [], "roc": [], "layers": [], "gallery": []}

    def add(self, kind: str, name: str, png: bytes, alt: str) -> str:
        """Save ``png`` as figures/``name``; return the <img> that embeds it."""
        (self.folder / name).write_bytes(png)
        self.written[kind].append(f"figures/{name}")
        return figures.img(figures.data_uri(png), alt)


def write_evaluation(sets: list[ScoredSet], model: Any, out: Path, model_info: dict[str, Any],
                     store: Store | None = None) -> dict[str, Any]:
    """Write metrics.json, metrics.md, report.html (self-contained) and figures/ for scored ``sets``
    (``sets[0]`` is the in-distribution set). ``model`` is the loaded NRM, used for layer names and renderings."""
    out.mkdir(parents=True, exist_ok=True)
    saved = FigureFiles(out / "figures")
    layer_names = list(model.latent_names)
    m = build_metrics(sets, layer_names, model_info)
    cols = {s.name: score_columns(s.table, layer_names) for s in sets}
    body = [*tables_html(m, model_info), *histograms_html(m, cols, saved), *roc_html(m, cols, layer_names, saved)]
    gallery_html, m["galleries"] = galleries(sets, model, store or Store(), saved)
    body += gallery_html
    m["figures"] = saved.written
    (out / "metrics.json").write_text(json.dumps(m, indent=2, default=_json_default) + "\n")
    (out / "metrics.md").write_text(metrics_markdown(m) + "\n")
    (out / "report.html").write_text(figures.page("NRM OOD evaluation", "\n".join(body)))
    return m


def tables_html(m: dict[str, Any], model_info: dict[str, Any]) -> list[str]:
    """The page's text and tables: convention, model, sets, error reasons, AUROC and per-set metrics."""
    oods = list(m["metrics"])
    body: list[str] = [f'<p class="note">{figures.esc(CONVENTION)}</p>']
    body.append(figures.esc(f"Model {model_info.get('uri')} (model_id {str(model_info.get('model_id'))[:12]}). ")
                + (f"Classifier accuracy on labelled in-distribution rows: <b>{m['accuracy']['accuracy']:.4f}</b> "
                   f"({m['accuracy']['labelled_rows']} rows)." if m["accuracy"] else "No labelled in-distribution rows."))
    th = m.get("threshold")
    if th:
        body.append(f'<p class="note">is_ood: {figures.esc(th["score"])} &lt; {th["value"]:.6g} (the checkpoint\'s threshold '
                    "score, first in the tables).</p>")
    body.append("<h2>Sets</h2>" + figures.table(
        ["set", "input", "rows", "ok", "error", "flagged OOD", "failed input files"],
        [[n, s["input"] + (f" (first {s['limit']} rows)" if s["limit"] else ""), s["rows"], s["ok"], s["error"],
          s["flagged_ood"], len(s["failed_inputs"])] for n, s in m["sets"].items()]))
    errs = [[n, r["reason"], r["rows"], r["example"]] for n, s in m["sets"].items() for r in s["error_reasons"]]
    if errs:
        body.append("<h3>Error rows by reason</h3>" + figures.table(["set", "reason", "rows", "example"], errs))
    if oods:
        body.append("<h2>AUROC (in-distribution = positive)</h2>" + figures.table(
            ["score", "used as", *oods],
            [[score_label(sc), sc["used_as"], *[(m["metrics"][o].get(sc["name"]) or {}).get("auroc") for o in oods]]
             for sc in m["scores"]]))
        if m["groups"]:
            body.append("<h2>Near / far OOD group means</h2>" + f'<p class="note">{figures.esc(group_note(m))}</p>'
                        + figures.table(*group_rows(m)))
        for o in oods:
            body.append(f"<h3>{figures.esc(o)}</h3>" + figures.table(
                ["score", "used as", *[h for _, h in METRICS]],
                [[score_label(sc), sc["used_as"], *[(m["metrics"][o].get(sc["name"]) or {}).get(k) for k, _ in METRICS]]
                 for sc in m["scores"]]))
    return body


def histograms_html(m: dict[str, Any], cols: dict[str, dict[str, tuple[bool, np.ndarray]]],
                    saved: FigureFiles) -> list[str]:
    """A histogram of each key score over every set, raw values (direction in the title), threshold marked."""
    th = m.get("threshold")
    body = ["<h2>Score distributions</h2>"]
    for k in (k for k in key_scores(m) if k in cols[IN]):
        up = cols[IN][k][0]
        series = {s: _finite(cols[s][k][1]) for s in cols if k in cols[s]}
        thv = th["value"] if th and th["score"] == k else None
        png = figures.histogram(k, f"{k} ({'higher = in-distribution' if up else 'higher = OOD'})", series, thv)
        body.append(saved.add("histograms", f"hist-{k}.png", png, f"histogram of {k}"))
    return body


def roc_html(m: dict[str, Any], cols: dict[str, dict[str, tuple[bool, np.ndarray]]], layer_names: list[str],
             saved: FigureFiles) -> list[str]:
    """ROC curves of the key scores, one figure per OOD set, and the AUROC of each per-layer latent term."""
    oods = list(m["metrics"])
    if not oods:
        return []
    body = ["<h2>ROC curves</h2>"]
    keys = [k for k in key_scores(m) if k in cols[IN]]
    for o in oods:
        curves = {}
        for k in keys:
            r = m["metrics"][o].get(k)
            if r is None:
                continue
            up = cols[IN][k][0]
            curves[k] = (orient(_finite(cols[IN][k][1]), up), orient(_finite(cols[o][k][1]), up),
                         r["auroc"])
        if curves:
            body.append(saved.add("roc", f"roc-{_safe(o)}.png", figures.roc(f"ROC: in vs {o}", curves), f"ROC {o}"))
    layer_cols = [f"latent_prior_{n}" for n in layer_names if f"latent_prior_{n}" in cols[IN]]
    if layer_cols:
        png = figures.bars("AUROC of the per-layer latent prior terms eta_l", layer_names[:len(layer_cols)],
                     {o: [(m["metrics"][o].get(c) or {}).get("auroc") for c in layer_cols] for o in oods})
        body.append("<h2>AUROC by layer</h2>" + saved.add("layers", "auroc-by-layer.png", png, "AUROC by layer"))
    return body


def galleries(sets: list[ScoredSet], model: Any, store: Store, saved: FigureFiles
              ) -> tuple[list[str], dict[str, dict[str, list[dict[str, Any]]]]]:
    """The most and least OOD rows of each set, each image over its rendering; (html, rows shown)."""
    body = ["<h2>Most and least OOD samples</h2>"
            '<p class="note">By the checkpoint\'s threshold score (ood_score column, higher = more OOD). '
            "Top row: the image as the model saw it; bottom row: its rendering h0 from the predicted class "
            "(de-normalised, min-max scaled). Captions: ood_score, predicted class and, when the input has one, "
            "the true label.</p>"]
    shown: dict[str, dict[str, list[dict[str, Any]]]] = {}
    classes = list(model.config.classes)
    for s in sets:
        policy, image_column = figures.read_options(s.manifest)
        shown[s.name] = {}
        for kind, most in (("most", True), ("least", False)):
            rows = extreme_rows(s.table, GALLERY, most)
            if not rows:
                continue
            imgs, renders, errors = figures.render_pairs(store, model, [(r["source_path"], r["source_row"]) for r in rows],
                                                   image_column, policy)
            caps = [figures.caption(r, classes, e) for r, e in zip(rows, errors, strict=True)]
            name = f"gallery-{_safe(s.name)}-{kind}.png"
            png = figures.gallery(f"{s.name}: {kind} OOD (ood_score)", imgs, renders, caps)
            body.append(saved.add("gallery", name, png, f"{kind} OOD of {s.name}"))
            shown[s.name][kind] = [{**r, "figure": f"figures/{name}", "error": e} for r, e in zip(rows, errors, strict=True)]
    return body, shown


def extreme_rows(table: pa.Table, k: int, most: bool) -> list[dict[str, Any]]:
    """The ``k`` ok rows with the highest (``most``) or lowest ood_score, as dicts of id/source/pred/score."""
    ok = table.filter(pc.fill_null(pc.equal(table["status"], "ok"), False))
    ok = ok.filter(pc.invert(pc.is_nan(pc.fill_null(ok["ood_score"], float("nan")))))
    if ok.num_rows == 0:
        return []
    ok = ok.sort_by([("ood_score", "descending" if most else "ascending"), ("source_path", "ascending"),
                     ("source_row", "ascending")]).slice(0, k)
    cols = [c for c in ("id", "source_path", "source_row", "pred", "label", "ood_score") if c in ok.column_names]
    return ok.select(cols).to_pylist()


def _finite(v: np.ndarray) -> np.ndarray:
    return v[np.isfinite(v)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
