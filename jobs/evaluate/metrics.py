"""The metrics of `nrm-ood evaluate`, pure functions of the scored tables: every score column on every
OOD set, the near / far group means, accuracy, error reasons; and metrics.md."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.evaluate.sets import ScoredSet
from nrm.metrics import group_means, ood_metrics, orient
from nrm.names import DETECTOR_PREFIX, POSTHOC
from nrm.scores import higher_is_in

# Scores drawn in histograms and ROC curves (every score is in the tables).
KEY_SCORES = ["latent_loglik", "loglik_bound", "recon_sq_error", "max_softmax", "energy"]
METRICS = [("auroc", "AUROC"), ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"), ("fpr95", "FPR@95TPR"),
           ("detection_error", "Det. error")]
GROUP_METRICS = [("auroc", "AUROC"), ("fpr95", "FPR@95TPR")]  # averaged over each group's sets
CONVENTION = (
    "In-distribution = positive class. Every score is oriented so that higher = more in-distribution "
    "before the metrics (scores where higher = more OOD are negated; column 'used as'). "
    "FPR@95TPR = fraction of OOD samples accepted as in-distribution at the threshold that keeps 95% of the "
    "in-distribution samples (Hendrycks & Gimpel 2017, Liang et al. 2018) - not OpenOOD v1.5's FPR@95, which "
    "takes OOD as positive. Detection error = min over thresholds of 0.5 (1 - TPR) + 0.5 FPR. "
    "AUPR-in: in-distribution positive; AUPR-out: OOD positive with the negated score."
)


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
            out[name] = (higher_is_in(name), _column(table, name, ok))

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
                out[f"latent_prior_{lname}"] = (higher_is_in("latent_prior_layers"), layers[:, i])
    for name in ("recon_sq_error", "loglik_bound", "max_softmax", "max_logit", "energy"):
        add(name)
    for f in table.schema:
        if f.name.startswith(DETECTOR_PREFIX) and pa.types.is_floating(f.type):
            add(f.name)
    for name in POSTHOC:  # the field's post-hoc baselines, when the checkpoint has them fitted
        add(name)
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
            row[score] = ood_metrics(orient(v_in_f, up), orient(v_out_f, up))
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
    means = {k: group_means({o: {c: (v or {}).get(k) for c, v in row.items()} for o, row in per_set.items()},
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
