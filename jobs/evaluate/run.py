"""`nrm-ood evaluate` end to end: score every set (or reuse its run), then write the metrics and the
report; and the lines the command line prints about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from jobs.evaluate.metrics import group_note, group_rows, key_scores
from jobs.evaluate.page import write_evaluation
from jobs.evaluate.sets import EvalOptions, EvalResult, EvaluateError, score_sets
from jobs.pipeline import Checkpoint, JobError
from jobs.storage import Store


def evaluate(opts: EvalOptions, echo: Callable[[str], None] = print) -> EvalResult:
    """Score every set (or reuse its committed run) and write the metrics and the report to ``opts.out``."""
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
    model = ckpt.load()
    det = model.config.fitted.detector
    info = {"uri": opts.model, "model_id": ckpt.model_id,
            "detector": {"name": det.main.name, "features": det.main.features,
                         **({"selection": det.selection} if det.selection else {})} if det and det.main else None}
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
