"""`nrm-ood evaluate`: score an in-distribution set and named OOD sets with the Ray job, then measure.

Every set goes through ``jobs.pipeline.run_score`` into ``<out>/scores`` under run id ``in`` or
``ood-<NAME>``; a committed run is reused (after checking that it was made from the same checkpoint
and input), so a re-run with one more ``--ood`` scores only the new set. Then, on the rows with
``status == "ok"``:

* ``metrics.json`` / ``metrics.md``: AUROC, AUPR-in, AUPR-out, FPR@95TPR and detection error
  (nrm.metrics: in-distribution = positive, scores oriented higher = in-distribution) for every
  score column and every OOD set, the direction each score was used in, the classifier's accuracy
  on labelled in-distribution rows, row counts and error rows;
* ``report.html``, self-contained (figures embedded as ``data:`` URIs; the same PNGs also in
  ``figures/``): score histograms, ROC curves, AUROC by layer of the per-layer latent terms, and
  galleries of the most and least OOD rows of each set (by the ``ood_score`` column) with the
  model's rendering h(0) under each image. Tables list the checkpoint's threshold score (the one
  that decides ``is_ood``) first, marked.
* near / far groups (OpenOOD style: ``--near NAME=URI`` and ``--far NAME=URI``; ``--ood`` sets stay
  ungrouped): for each group, the mean AUROC and mean FPR@95TPR over its sets for every score column
  (``nrm.metrics.group_means``; a score missing on any set of the group has no mean), in
  ``metrics.json`` ("groups"), ``metrics.md``, ``report.html`` and on screen;
* ``report.html`` with PNG figures in ``figures/`` beside it: score histograms, ROC curves, AUROC by
  layer of the per-layer latent terms, and galleries of the most and least OOD rows of each set
  (by the ``ood_score`` column) with the model's rendering h(0) under each image.

``--limit N`` keeps the first N rows of each set: files in sorted URI order (as the job lists
them), rows in file order, copied to ``<out>/inputs/<name>.parquet`` (with ``<name>.json`` saying
where they came from), and that copy is what gets scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import figures as F
from jobs import manifest
from jobs.filtering import FilterError, read_scores
from jobs.pipeline import Checkpoint, JobError, ScoreOptions, run_score
from jobs.storage import StorageError, Store, absolute
from nrm import metrics
from nrm.posthoc import REGISTRY as POSTHOC
from nrm.scores import HIGHER_IS_IN

IN = "in"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Scores drawn in histograms and ROC curves (every score is in the tables).
KEY_SCORES = ["latent_loglik", "loglik_bound", "recon_sq_error", "max_softmax", "energy"]
METRICS = [("auroc", "AUROC"), ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"), ("fpr95", "FPR@95TPR"),
           ("detection_error", "Det. error")]
GALLERY = 8  # images per gallery strip
GROUPS = ("near", "far")  # OpenOOD's OOD groups, each a CLI option; --ood sets belong to none
GROUP_METRICS = [("auroc", "AUROC"), ("fpr95", "FPR@95TPR")]  # averaged over each group's sets
CONVENTION = (
    "In-distribution = positive class. Every score is oriented so that higher = more in-distribution "
    "before the metrics (scores where higher = more OOD are negated; column 'used as'). "
    "FPR@95TPR = fraction of OOD samples accepted as in-distribution at the threshold that keeps 95% of the "
    "in-distribution samples (Hendrycks & Gimpel 2017, Liang et al. 2018) - not OpenOOD v1.5's FPR@95, which "
    "takes OOD as positive. Detection error = min over thresholds of 0.5 (1 - TPR) + 0.5 FPR. "
    "AUPR-in: in-distribution positive; AUPR-out: OOD positive with the negated score."
)


class EvaluateError(RuntimeError):
    """The evaluation cannot proceed; the message is one clear sentence."""


# ---------------------------------------------------------------------------- options
def parse_ood(specs: list[str], option: str = "--ood") -> dict[str, str]:
    """``["NAME=URI", ...]`` -> {NAME: URI}, in order. Raises ValueError naming the bad entry (and ``option``)."""
    out: dict[str, str] = {}
    for s in specs:
        name, eq, uri = s.partition("=")
        name, uri = name.strip(), uri.strip()
        if not eq or not name or not uri:
            raise ValueError(f"{option} {s!r}: expected NAME=URI, e.g. {option} svhn=s3://bucket/svhn/test/")
        if not NAME.match(name):
            raise ValueError(f"{option} {s!r}: NAME {name!r} must be letters, digits, '_', '.', '-' "
                             "(starting with a letter or digit, at most 64 characters)")
        if name == IN:
            raise ValueError(f"{option} {s!r}: NAME {IN!r} is reserved for the in-distribution set")
        if name in out:
            raise ValueError(f"{option} {s!r}: NAME {name!r} is given twice")
        out[name] = uri
    return out


def group_sets(ood: dict[str, str], near: dict[str, str], far: dict[str, str]
               ) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Parsed --ood, --near, --far -> (every OOD set NAME -> URI: near, far, then ungrouped; the
    non-empty groups "near"/"far" -> NAMEs). A NAME given to two options is a ValueError naming both."""
    options = {"--near": near, "--far": far, "--ood": ood}
    sets: dict[str, str] = {}
    seen: dict[str, str] = {}
    for option, named in options.items():
        for name, uri in named.items():
            if name in seen:
                raise ValueError(f"{option} {name}={uri}: NAME {name!r} is also given to {seen[name]}; "
                                 "each OOD set needs its own NAME")
            seen[name] = option
            sets[name] = uri
    return sets, {g: list(named) for g, named in zip(GROUPS, (near, far), strict=True) if named}


@dataclass
class EvalOptions:
    model: str
    input: str
    ood: dict[str, str]  # NAME -> URI
    out: Path  # local directory: scores/, inputs/, metrics.*, report.html, figures/
    limit: int | None = None
    batch_size: int = 512
    address: str | None = None
    endpoint_url: str | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)  # "near"/"far" -> NAMEs of ood


@dataclass
class ScoredSet:
    """One scored set: its committed run and every output row of it."""

    name: str  # "in" or the OOD NAME
    run_id: str
    input: str  # what the user named
    table: pa.Table
    manifest: dict[str, Any] = field(default_factory=dict)
    limit: dict[str, Any] | None = None  # the --limit copy's record, when one was made
    group: str | None = None  # "near", "far" or None (ungrouped --ood set, or the in-distribution set)


@dataclass
class EvalResult:
    out: Path
    metrics: dict[str, Any]
    incomplete: list[str]  # sets whose run had unreadable input files

    @property
    def exit_code(self) -> int:
        return 3 if self.incomplete else 0


def run_id(name: str) -> str:
    return IN if name == IN else f"ood-{name}"


# ---------------------------------------------------------------------------- --limit copies
def limited_copy(store: Store, uri: str, n: int, dest: Path) -> dict[str, Any]:
    """Write the first ``n`` rows of ``uri`` (files sorted by URI, rows in order) to ``dest``."""
    try:
        files = store.list_parquet(uri)
    except StorageError as e:
        raise EvaluateError(str(e)) from None
    parts: list[pa.Table] = []
    used: list[str] = []
    failed: list[dict[str, str]] = []
    taken = 0
    for f in files:
        if taken >= n:
            break
        fs, path = store.filesystem(f.uri)
        try:
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                for rg in range(pf.num_row_groups):
                    if taken >= n:
                        break
                    t = pf.read_row_group(rg)
                    t = t.slice(0, n - taken)
                    parts.append(t)
                    taken += t.num_rows
        except Exception as e:  # the scoring job would list it as a failed input; so does the copy
            failed.append({"uri": f.uri, "error": f"cannot read: {type(e).__name__}: {e}"})
            continue
        used.append(f.uri)
    if not parts:
        raise EvaluateError(f"no readable rows in {uri!r} to take --limit {n} from")
    try:
        table = pa.concat_tables(parts, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise EvaluateError(f"the files of {uri!r} have different schemas and cannot be concatenated for "
                            f"--limit: {e}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest, row_group_size=512)
    return {"source": uri, "limit": n, "rows": table.num_rows, "files": used, "failed_inputs": failed}


# ---------------------------------------------------------------------------- scoring
def score_sets(opts: EvalOptions, ckpt: Checkpoint, echo: Callable[[str], None] = print) -> list[ScoredSet]:
    """Score (or reuse) every set; returns them in order: in-distribution first, then --ood order."""
    store = Store(opts.endpoint_url)
    scores_root = str(opts.out / "scores")
    out: list[ScoredSet] = []
    for name, given in [(IN, opts.input), *opts.ood.items()]:
        rid = run_id(name)
        uri = absolute(given)
        committed = manifest.read(store, scores_root, rid)
        limit: dict[str, Any] | None = None
        source = uri
        if opts.limit is not None:
            dest = opts.out / "inputs" / f"{name}.parquet"
            record = opts.out / "inputs" / f"{name}.json"
            source = str(dest)
            if committed is not None:
                limit = json.loads(record.read_text()) if record.is_file() else None
                if limit is None or limit.get("source") != uri or limit.get("limit") != opts.limit:
                    made = (f"the first {limit.get('limit')} rows of {limit.get('source')!r}" if limit
                            else f"{committed.get('input')!r} without --limit")
                    raise EvaluateError(
                        f"{opts.out} already holds a committed run {rid!r} of {made}, not the first {opts.limit} "
                        f"rows of {uri!r}; use a fresh --out or delete {scores_root}/{rid}")
            else:
                limit = limited_copy(store, uri, opts.limit, dest)
                record.write_text(json.dumps(limit, indent=2) + "\n")
        if committed is not None:
            if committed.get("input") != source:
                raise EvaluateError(f"{opts.out} already holds a committed run {rid!r} of {committed.get('input')!r}, "
                                    f"not {source!r}; use a fresh --out or delete {scores_root}/{rid}")
            if committed["model"]["model_id"] != ckpt.model_id:
                raise EvaluateError(f"{opts.out} already holds a committed run {rid!r} made by model "
                                    f"{committed['model']['model_id'][:12]}, not {ckpt.model_id[:12]} ({opts.model}); "
                                    f"use a fresh --out or delete {scores_root}/{rid}")
            if committed["model"].get("config_sha256") != ckpt.config_sha256:
                raise EvaluateError(f"{opts.out} already holds a committed run {rid!r} made by the same weights "
                                    f"({ckpt.model_id[:12]}) with a different config.json (threshold or detector "
                                    f"refitted?); use a fresh --out or delete {scores_root}/{rid}")
            echo(f"set {name}: reusing committed run {rid} ({committed['rows']['in']} rows)")
        else:
            echo(f"set {name}: scoring {source}")
            try:
                res = run_score(ScoreOptions(opts.model, source, scores_root, run_id=rid, batch_size=opts.batch_size,
                                             address=opts.address, endpoint_url=opts.endpoint_url), echo=echo)
            except JobError as e:
                raise EvaluateError(f"set {name}: {e}") from None
            committed = res.manifest if res.status != "lost-commit-race" else manifest.read(store, scores_root, rid)
            if committed is None:
                raise EvaluateError(f"set {name}: run {rid} was not committed")
        try:
            table = read_scores(Store(), f"{scores_root}/{rid}")
        except FilterError as e:
            raise EvaluateError(f"set {name}: {e}") from None
        out.append(ScoredSet(name, rid, given, table, committed, limit))
    return out


# ---------------------------------------------------------------------------- metrics (pure)
def _column(table: pa.Table, name: str, mask: np.ndarray) -> np.ndarray:
    return pc.fill_null(table[name].cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)[mask]


def ok_mask(table: pa.Table) -> np.ndarray:
    return pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)


def score_columns(table: pa.Table, layer_names: list[str]) -> dict[str, tuple[bool, np.ndarray]]:
    """Every score of the ok rows of a scores table: name -> (higher_is_in, raw values), in report order.

    Columns: latent_loglik, latent_prior, latent_prior_<layer> per entry of latent_prior_layers,
    recon_sq_error, loglik_bound, max_softmax, max_logit, energy, then every float ``det_*`` column
    (higher = in-distribution). NaN marks a value that is missing for that row."""
    ok = ok_mask(table)
    out: dict[str, tuple[bool, np.ndarray]] = {}

    def add(name: str) -> None:
        if name in table.column_names:
            out[name] = (HIGHER_IS_IN[name], _column(table, name, ok))

    add("latent_loglik")
    add("latent_prior")
    if "latent_prior_layers" in table.column_names:
        col = table["latent_prior_layers"].filter(pa.array(ok)).combine_chunks()  # ok rows hold every layer
        width = col.type.list_size if pa.types.is_fixed_size_list(col.type) else len(layer_names)
        flat = pc.fill_null(col.flatten(), np.nan).to_numpy(zero_copy_only=False)
        if len(flat) == len(col) * width:
            layers = flat.reshape(len(col), width)
            for i in range(width):
                lname = layer_names[i] if i < len(layer_names) else f"layer{i}"
                out[f"latent_prior_{lname}"] = (HIGHER_IS_IN["latent_prior_layers"], layers[:, i])
    for name in ("recon_sq_error", "loglik_bound", "max_softmax", "max_logit", "energy"):
        add(name)
    for f in table.schema:
        if f.name.startswith("det_") and pa.types.is_floating(f.type):
            out[f.name] = (True, _column(table, f.name, ok))
    for cls in POSTHOC.values():  # the field's post-hoc baselines, when the checkpoint has them fitted
        add(cls.column)
    return out


def direction(higher_is_in: bool) -> str:
    return "score (higher = in-distribution)" if higher_is_in else "-score (higher = OOD)"


def metrics_table(in_table: pa.Table, ood_tables: dict[str, pa.Table], layer_names: list[str]
                  ) -> dict[str, Any]:
    """The metrics of every score on every OOD set: {"scores": [{name, higher_is_in, used_as}],
    "metrics": {ood: {score: {auroc, aupr_in, aupr_out, fpr95, detection_error} or None}}}.

    A score gets None for a set when either side has no finite value (e.g. no ok rows)."""
    ind = score_columns(in_table, layer_names)
    result: dict[str, Any] = {
        "scores": [{"name": n, "higher_is_in": up, "used_as": direction(up)} for n, (up, _) in ind.items()],
        "metrics": {},
    }
    for name, t in ood_tables.items():
        ood = score_columns(t, layer_names)
        row: dict[str, dict[str, float] | None] = {}
        for score, (up, v_in) in ind.items():
            v_out = ood.get(score, (up, np.zeros(0)))[1]
            v_in_f, v_out_f = v_in[np.isfinite(v_in)], v_out[np.isfinite(v_out)]
            if v_in_f.size == 0 or v_out_f.size == 0:
                row[score] = None
                continue
            row[score] = metrics.ood_metrics(metrics.orient(v_in_f, up), metrics.orient(v_out_f, up))
        result["metrics"][name] = row
    return result


def accuracy(table: pa.Table) -> dict[str, Any] | None:
    """Classifier accuracy (pred == label) on the ok rows that carry a label; None without labels."""
    if "label" not in table.column_names:
        return None
    ok = ok_mask(table)
    label = pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False)[ok]
    pred = pc.fill_null(table["pred"], -2).to_numpy(zero_copy_only=False)[ok]
    has = label >= 0
    if not has.any():
        return None
    return {"accuracy": float(np.mean(pred[has] == label[has])), "labelled_rows": int(has.sum())}


def reason_key(message: str) -> str:
    """An error message with its row-specific parts (addresses, numbers) masked, so alike errors group:
    'cannot decode image (4 bytes): ... at 0x7f...' -> 'cannot decode image (N bytes): ... at 0x…'."""
    return re.sub(r"0x[0-9a-fA-F]+|\d+", lambda m: "0x…" if m.group().startswith("0x") else "N", message)


def error_reasons(table: pa.Table, top: int = 20) -> list[dict[str, Any]]:
    """Error rows grouped by ``reason_key`` of their message, most frequent first, each with one raw
    example (at most ``top`` groups, then one "other reasons" group)."""
    err = table.filter(pc.fill_null(pc.equal(table["status"], "error"), False))["error"]
    groups: dict[str, list[Any]] = {}
    for e in err.to_pylist():
        g = groups.setdefault(reason_key(str(e)), [0, str(e)])
        g[0] += 1
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    out = [{"reason": r, "rows": n, "example": ex} for r, (n, ex) in ranked[:top]]
    if len(ranked) > top:
        out.append({"reason": f"({len(ranked) - top} other reasons)", "rows": sum(g[0] for _, g in ranked[top:]),
                    "example": ranked[top][1][1]})
    return out


def set_summary(s: ScoredSet) -> dict[str, Any]:
    t = s.table
    ok = ok_mask(t)
    flagged = pc.fill_null(t["is_ood"], False).to_numpy(zero_copy_only=False)[ok] if "is_ood" in t.column_names else []
    failed = list(s.manifest.get("failed_inputs", [])) + list((s.limit or {}).get("failed_inputs", []))
    return {"input": s.input, "run_id": s.run_id, "scored": s.manifest.get("input", s.input), "rows": t.num_rows,
            "ok": int(ok.sum()), "error": int(t.num_rows - ok.sum()),
            "flagged_ood": int(np.sum(flagged)), "flagged_ood_rate": float(np.mean(flagged)) if ok.any() else None,
            "error_reasons": error_reasons(t), "failed_inputs": failed,
            "limit": (s.limit or {}).get("limit"), "group": s.group}


def build_metrics(sets: list[ScoredSet], layer_names: list[str], model_info: dict[str, Any]) -> dict[str, Any]:
    """metrics_table plus the sets, accuracy and threshold; the checkpoint's threshold score (the one
    that decides ``is_ood``) is the first entry of "scores" and the only one with "default": true."""
    ind = sets[0]
    table = metrics_table(ind.table, {s.name: s.table for s in sets[1:]}, layer_names)
    default = (ind.manifest.get("threshold") or {}).get("score")
    table["scores"] = sorted(table["scores"], key=lambda sc: sc["name"] != default)  # stable: the rest keep their order
    for sc in table["scores"]:
        sc["default"] = sc["name"] == default
    return {
        "convention": CONVENTION,
        "model": model_info,
        "threshold": ind.manifest.get("threshold"),
        "sets": {s.name: set_summary(s) for s in sets},
        "accuracy": accuracy(ind.table),
        **table,
        "groups": group_table(sets, table["metrics"]),
    }


def key_scores(m: dict[str, Any]) -> list[str]:
    """The scores drawn and printed: the default (threshold) score first, then those of KEY_SCORES present."""
    names = [sc["name"] for sc in m["scores"]]
    first = [sc["name"] for sc in m["scores"] if sc.get("default")]
    return [*first, *(k for k in KEY_SCORES if k in names and k not in first)]


def score_label(sc: dict[str, Any]) -> str:
    """A score's name in the tables, marked when it is the one that decides ``is_ood``."""
    return f"{sc['name']} (default: decides is_ood)" if sc.get("default") else sc["name"]


def group_table(sets: list[ScoredSet], per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{group: {"sets": [NAME...], "auroc": {score: mean or None}, "fpr95": {score: mean or None}}} over
    the OOD sets of each group (nrm.metrics.group_means), groups in the order of their first set."""
    groups: dict[str, list[str]] = {}
    for s in sets[1:]:
        if s.group:
            groups.setdefault(s.group, []).append(s.name)
    means = {k: metrics.group_means({o: {c: (v or {}).get(k) for c, v in row.items()} for o, row in per_set.items()},
                                    groups) for k, _ in GROUP_METRICS}
    return {g: {"sets": names, **{k: means[k][g] for k, _ in GROUP_METRICS}} for g, names in groups.items()}


def group_rows(m: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The group means as one table: header [score, used as, <group> AUROC, <group> FPR@95TPR, ...] and
    one row per score column (a value is None where the score has no mean)."""
    groups = m.get("groups") or {}
    header = ["score", "used as", *[f"{g} {h}" for g in groups for _, h in GROUP_METRICS]]
    rows = [[sc["name"], sc["used_as"], *[groups[g][k].get(sc["name"]) for g in groups for k, _ in GROUP_METRICS]]
            for sc in m["scores"]]
    return header, rows


GROUP_NOTE = ("Mean over the OOD sets of each group ({sets}). FPR@95TPR = fraction of OOD samples accepted "
              "when 95% of in-distribution samples are accepted (TPR 95%, in-distribution positive). "
              "A score missing on any set of a group has no mean.")


def group_note(m: dict[str, Any]) -> str:
    return GROUP_NOTE.format(sets="; ".join(f"{g}: {', '.join(v['sets'])}" for g, v in m["groups"].items()))


# ---------------------------------------------------------------------------- metrics.md
def metrics_markdown(m: dict[str, Any]) -> str:
    lines = ["# OOD evaluation", "",
             f"Model `{m['model'].get('uri')}` (model_id `{str(m['model'].get('model_id'))[:12]}`).", "",
             m["convention"], ""]
    th = m.get("threshold")
    if th:
        lines += [f"Checkpoint threshold: flag OOD when `{th['score']}` < {th['value']:.6g} "
                  f"(fitted to keep {th.get('tpr', 0.95):.0%} of held-out in-distribution data); it is the first row "
                  "of the tables below.", ""]
    det = m["model"].get("detector")
    if det:
        lines += [f"`det_{det['name']}` is the checkpoint's fitted detector: {det['name']} on the NRM features "
                  f"`{det['features']}` (nrm.detectors)" + (", chosen on validation OOD sets (worst-case AUROC):"
                                                            if det.get("selection") else "."), ""]
        for column, row in det.get("selection", {}).items():
            lines.append(f"- {column}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        lines += [""] if det.get("selection") else []
    acc = m.get("accuracy")
    lines += ["Classifier accuracy on labelled in-distribution rows: "
              + (f"**{acc['accuracy']:.4f}** ({acc['labelled_rows']} rows)." if acc else "no labels."), ""]
    lines += ["## Sets", "", "| set | input | rows | ok | error | flagged OOD (checkpoint threshold) | failed input files |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in m["sets"].items():
        rate = f" ({s['flagged_ood_rate']:.1%})" if s["flagged_ood_rate"] is not None else ""
        lines.append(f"| {name} | `{s['input']}`{' (first ' + str(s['limit']) + ' rows)' if s['limit'] else ''} "
                     f"| {s['rows']} | {s['ok']} | {s['error']} | {s['flagged_ood']}{rate} | {len(s['failed_inputs'])} |")
    lines.append("")
    errs = [(n, r) for n, s in m["sets"].items() for r in s["error_reasons"]]
    if errs:
        lines += ["Error rows by reason (digits masked as N to group alike errors):", "",
                  "| set | reason | rows | example |", "|---|---|---:|---|"]
        lines += [f"| {n} | {_md(r['reason'])} | {r['rows']} | {_md(r['example'])} |" for n, r in errs]
        lines.append("")
    oods = list(m["metrics"])
    if oods:
        lines += ["## AUROC by score and OOD set", "", "| score | used as | " + " | ".join(oods) + " |",
                  "|---|---|" + "---:|" * len(oods)]
        for sc in m["scores"]:
            vals = [m["metrics"][o].get(sc["name"]) for o in oods]
            lines.append(f"| {_md(score_label(sc))} | {sc['used_as']} | "
                         + " | ".join(f"{v['auroc']:.4f}" if v else "–" for v in vals) + " |")
        lines.append("")
    if m.get("groups"):
        header, rows = group_rows(m)
        lines += ["## Near / far OOD group means", "", group_note(m), "", "| " + " | ".join(header) + " |",
                  "|---|---|" + "---:|" * (len(header) - 2)]
        lines += ["| " + " | ".join([*r[:2], *(f"{v:.4f}" if v is not None else "–" for v in r[2:])]) + " |"
                  for r in rows]
        lines.append("")
    for o in oods:
        lines += [f"## {o}", "", "| score | used as | " + " | ".join(h for _, h in METRICS) + " |",
                  "|---|---|" + "---:|" * len(METRICS)]
        for sc in m["scores"]:
            v = m["metrics"][o].get(sc["name"])
            lines.append(f"| {_md(score_label(sc))} | {sc['used_as']} | "
                         + " | ".join(f"{v[k]:.4f}" if v else "–" for k, _ in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------- report.html
class Figures:
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
        return F.img(F.data_uri(png), alt)


def write_evaluation(sets: list[ScoredSet], model: Any, out: Path, model_info: dict[str, Any],
                     store: Store | None = None) -> dict[str, Any]:
    """Write metrics.json, metrics.md, report.html (self-contained) and figures/ for scored ``sets``
    (``sets[0]`` is the in-distribution set). ``model`` is the loaded NRM, used for layer names and renderings."""
    out.mkdir(parents=True, exist_ok=True)
    figures = Figures(out / "figures")
    layer_names = list(model.latent_names)
    m = build_metrics(sets, layer_names, model_info)
    cols = {s.name: score_columns(s.table, layer_names) for s in sets}
    body = [*tables_html(m, model_info), *histograms_html(m, cols, figures), *roc_html(m, cols, layer_names, figures)]
    gallery_html, m["galleries"] = galleries(sets, model, store or Store(), figures)
    body += gallery_html
    m["figures"] = figures.written
    (out / "metrics.json").write_text(json.dumps(m, indent=2, default=_json_default) + "\n")
    (out / "metrics.md").write_text(metrics_markdown(m) + "\n")
    (out / "report.html").write_text(F.page("NRM OOD evaluation", "\n".join(body)))
    return m


def tables_html(m: dict[str, Any], model_info: dict[str, Any]) -> list[str]:
    """The page's text and tables: convention, model, sets, error reasons, AUROC and per-set metrics."""
    oods = list(m["metrics"])
    body: list[str] = [f'<p class="note">{F.esc(CONVENTION)}</p>']
    body.append(F.esc(f"Model {model_info.get('uri')} (model_id {str(model_info.get('model_id'))[:12]}). ")
                + (f"Classifier accuracy on labelled in-distribution rows: <b>{m['accuracy']['accuracy']:.4f}</b> "
                   f"({m['accuracy']['labelled_rows']} rows)." if m["accuracy"] else "No labelled in-distribution rows."))
    th = m.get("threshold")
    if th:
        body.append(f'<p class="note">is_ood: {F.esc(th["score"])} &lt; {th["value"]:.6g} (the checkpoint\'s threshold '
                    "score, first in the tables).</p>")
    body.append("<h2>Sets</h2>" + F.table(
        ["set", "input", "rows", "ok", "error", "flagged OOD", "failed input files"],
        [[n, s["input"] + (f" (first {s['limit']} rows)" if s["limit"] else ""), s["rows"], s["ok"], s["error"],
          s["flagged_ood"], len(s["failed_inputs"])] for n, s in m["sets"].items()]))
    errs = [[n, r["reason"], r["rows"], r["example"]] for n, s in m["sets"].items() for r in s["error_reasons"]]
    if errs:
        body.append("<h3>Error rows by reason</h3>" + F.table(["set", "reason", "rows", "example"], errs))
    if oods:
        body.append("<h2>AUROC (in-distribution = positive)</h2>" + F.table(
            ["score", "used as", *oods],
            [[score_label(sc), sc["used_as"], *[(m["metrics"][o].get(sc["name"]) or {}).get("auroc") for o in oods]]
             for sc in m["scores"]]))
        if m["groups"]:
            body.append("<h2>Near / far OOD group means</h2>" + f'<p class="note">{F.esc(group_note(m))}</p>'
                        + F.table(*group_rows(m)))
        for o in oods:
            body.append(f"<h3>{F.esc(o)}</h3>" + F.table(
                ["score", "used as", *[h for _, h in METRICS]],
                [[score_label(sc), sc["used_as"], *[(m["metrics"][o].get(sc["name"]) or {}).get(k) for k, _ in METRICS]]
                 for sc in m["scores"]]))
    return body


def histograms_html(m: dict[str, Any], cols: dict[str, dict[str, tuple[bool, np.ndarray]]],
                    figures: Figures) -> list[str]:
    """A histogram of each key score over every set, raw values (direction in the title), threshold marked."""
    th = m.get("threshold")
    body = ["<h2>Score distributions</h2>"]
    for k in (k for k in key_scores(m) if k in cols[IN]):
        up = cols[IN][k][0]
        series = {s: _finite(cols[s][k][1]) for s in cols if k in cols[s]}
        thv = th["value"] if th and th["score"] == k else None
        png = F.histogram(k, f"{k} ({'higher = in-distribution' if up else 'higher = OOD'})", series, thv)
        body.append(figures.add("histograms", f"hist-{k}.png", png, f"histogram of {k}"))
    return body


def roc_html(m: dict[str, Any], cols: dict[str, dict[str, tuple[bool, np.ndarray]]], layer_names: list[str],
             figures: Figures) -> list[str]:
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
            curves[k] = (metrics.orient(_finite(cols[IN][k][1]), up), metrics.orient(_finite(cols[o][k][1]), up),
                         r["auroc"])
        if curves:
            body.append(figures.add("roc", f"roc-{_safe(o)}.png", F.roc(f"ROC: in vs {o}", curves), f"ROC {o}"))
    layer_cols = [f"latent_prior_{n}" for n in layer_names if f"latent_prior_{n}" in cols[IN]]
    if layer_cols:
        png = F.bars("AUROC of the per-layer latent prior terms eta_l", layer_names[:len(layer_cols)],
                     {o: [(m["metrics"][o].get(c) or {}).get("auroc") for c in layer_cols] for o in oods})
        body.append("<h2>AUROC by layer</h2>" + figures.add("layers", "auroc-by-layer.png", png, "AUROC by layer"))
    return body


def galleries(sets: list[ScoredSet], model: Any, store: Store, figures: Figures
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
        policy, image_column = F.read_options(s.manifest)
        shown[s.name] = {}
        for kind, most in (("most", True), ("least", False)):
            rows = extreme_rows(s.table, GALLERY, most)
            if not rows:
                continue
            imgs, renders, errors = F.render_pairs(store, model, [(r["source_path"], r["source_row"]) for r in rows],
                                                   image_column, policy)
            caps = [F.caption(r, classes, e) for r, e in zip(rows, errors, strict=True)]
            name = f"gallery-{_safe(s.name)}-{kind}.png"
            png = F.gallery(f"{s.name}: {kind} OOD (ood_score)", imgs, renders, caps)
            body.append(figures.add("gallery", name, png, f"{kind} OOD of {s.name}"))
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


# ---------------------------------------------------------------------------- the command
def evaluate(opts: EvalOptions, echo: Callable[[str], None] = print) -> EvalResult:
    """Score every set (or reuse its committed run) and write the metrics and the report to ``opts.out``."""
    import nrm

    if opts.limit is not None and opts.limit < 1:
        raise EvaluateError(f"--limit must be >= 1, got {opts.limit}")
    if not opts.ood:
        raise EvaluateError("give at least one OOD set: --ood, --near or --far NAME=URI")
    opts = replace(opts, out=opts.out.resolve())
    opts.out.mkdir(parents=True, exist_ok=True)
    store = Store(opts.endpoint_url)
    try:
        ckpt = Checkpoint.fetch(store, opts.model)
    except JobError as e:
        raise EvaluateError(str(e)) from None
    group_of = {name: g for g, names in opts.groups.items() for name in names}
    sets = [replace(s, group=group_of.get(s.name)) for s in score_sets(opts, ckpt, echo)]
    with ckpt.local() as path:
        model = nrm.load(path, expect_model_id=ckpt.model_id)
    det = model.config.fitted.detector
    info = {"uri": opts.model, "model_id": ckpt.model_id,
            "detector": {"name": det.main.name, "features": det.main.features,
                         **({"selection": det.selection} if det.selection else {})} if det else None}
    m = write_evaluation(sets, model, opts.out, info, store)
    incomplete = [s.name for s in sets if m["sets"][s.name]["failed_inputs"]]
    return EvalResult(opts.out, m, incomplete)


def summary(result: EvalResult) -> str:
    m = result.metrics
    lines = [f"wrote {result.out / 'metrics.json'}, metrics.md, report.html and {sum(map(len, m['figures'].values()))} "
             "figures"]
    if m["accuracy"]:
        lines.append(f"in-distribution accuracy {m['accuracy']['accuracy']:.4f} ({m['accuracy']['labelled_rows']} labelled rows)")
    keys = key_scores(m)
    th = m.get("threshold")
    marked = [k + ("*" if th and k == th["score"] else "") for k in keys]
    width = max(15, *(len(k) + 1 for k in marked))
    lines.append(f"AUROC (in-distribution = positive)\n{'OOD set':16} " + " ".join(f"{k:>{width}}" for k in marked))
    for o, row in m["metrics"].items():
        lines.append(f"{o:16} " + " ".join(f"{row[k]['auroc']:>{width}.4f}" if row.get(k) else f"{'-':>{width}}"
                                           for k in keys))
    if th:
        lines.append(f"* decides is_ood: flagged when {th['score']} < {th['value']:.6g} (the checkpoint's threshold); "
                     "every score is in metrics.md")
    if m["groups"]:
        header, rows = group_rows(m)
        width = max(len(r[0]) for r in rows)
        lines.append(group_note(m))
        lines.append(f"{header[0]:{width}} " + " ".join(f"{h:>16}" for h in header[2:]))
        lines += [f"{r[0]:{width}} " + " ".join(f"{v:>16.4f}" if v is not None else f"{'-':>16}" for v in r[2:])
                  for r in rows]
    for name in result.incomplete:
        lines.append(f"set {name}: some input files could not be read (listed in metrics.json)")
    return "\n".join(lines)
