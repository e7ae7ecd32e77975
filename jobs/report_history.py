"""The "runs over time" section of `nrm-ood report` on an output root (jobs/report.py calls ``section``).

From the committed manifests alone (no row is read): the flagged fraction of each run against the
expected rate, with the band of fractions that in-distribution data of that run's size reaches by
chance (binomial, two-sided at the audit's alpha) and the alert limit; and each run's KS distance
against the checkpoint's reference, with the distance chance reaches at that size (kstwo) and the
alert limit (jobs.drift, default limits: what `nrm-ood audit` uses without options). With ``--input``,
the latest run's most OOD images beside typical in-distribution ones (the rows whose threshold score
lies nearest the reference's median).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
from matplotlib.figure import Figure

from jobs import drift, figures, manifest, runs
from jobs.filtering import read_scores
from jobs.storage import Store, join

LIMITS = drift.Limits()


def is_root(store: Store, scores: str) -> bool:
    """Whether ``scores`` is an output root (runs below it) rather than one committed run."""
    base, _, rid = scores.rstrip("/").rpartition("/")
    return not base or manifest.read(store, base, rid) is None


def _over_time(rows: list[runs.RunRow]) -> bytes:
    """Two panels over the runs in time order: flagged fraction and KS distance, each with its chance
    band and alert limit; drift runs in red."""
    fig = Figure(figsize=(max(6.4, 0.6 * len(rows) + 3), 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(rows))
    red = ["tab:red" if r.verdict == "drift" else "tab:blue" for r in rows]
    flagged = np.array([np.nan if r.drift.flagged_fraction is None else 100 * r.drift.flagged_fraction for r in rows])
    exp = np.array([np.nan if r.drift.expected is None else 100 * r.drift.expected for r in rows])
    bands = np.array([[100 * b for b in drift.band(r.drift.expected, r.drift.ok, LIMITS.alpha)]
                      if r.drift.expected is not None and r.drift.ok else [np.nan, np.nan] for r in rows])
    caps = np.array([np.nan if (c := r.drift.max_flagged(LIMITS)) is None else 100 * c for r in rows])
    top.fill_between(x, bands[:, 0], bands[:, 1], color="tab:green", alpha=0.2, step="mid",
                     label=f"in-distribution by chance (binomial, alpha {LIMITS.alpha:g})")
    top.plot(x, exp, "g--", linewidth=1, label="expected rate")
    top.plot(x, caps, "k:", linewidth=1, label="alert limit (--max-flagged)")
    top.plot(x, flagged, color="0.5", linewidth=1)
    top.scatter(x, flagged, c=red, zorder=3, label="run (red: drift)")
    top.set_ylabel("flagged OOD, % of ok rows")
    top.legend(fontsize=7)
    ks = np.array([np.nan if r.drift.ks is None else r.drift.ks for r in rows])
    crit = np.array([drift.ks_critical(r.drift.ok, LIMITS.alpha) if r.drift.ok else np.nan for r in rows])
    bottom.fill_between(x, 0, crit, color="tab:green", alpha=0.2, step="mid", label="reached by chance (kstwo)")
    bottom.axhline(LIMITS.max_drift, color="k", linestyle=":", linewidth=1, label="alert limit (--max-drift)")
    bottom.plot(x, ks, color="0.5", linewidth=1)
    bottom.scatter(x, ks, c=red, zorder=3)
    bottom.set_ylabel("KS distance to the reference")
    bottom.set_xticks(x, [f"{r.run_id}\n{r.created[:10]}" for r in rows], fontsize=7,
                      rotation=30 if len(rows) > 6 else 0)
    bottom.legend(fontsize=7)
    fig.suptitle("Runs over time", fontsize=10)
    return figures.to_png(fig)


def _latest_gallery(store: Store, model: Any, root: str, run: manifest.Run, input: str, top: int) -> list[str]:
    """The latest run's ``top`` most OOD rows beside ``top`` typical ones, as image strips."""
    from jobs.report import locate

    t = read_scores(store, join(root, run.run_id), ["source_path", "source_row", "status", "ood_score", "pred", "label"])
    t = t.filter(pc.equal(t["status"], "ok"))
    if not t.num_rows:
        return ["<p>The latest run has no ok rows.</p>"]
    score = t["ood_score"].to_numpy()
    th = model.config.fitted.threshold
    ref = th.reference if th is not None else None
    centre = -float(np.median(ref.quantiles)) if ref is not None else float(np.median(score))
    picks = {"most OOD": np.argsort(-score)[:top], "typical in-distribution": np.argsort(np.abs(score - centre))[:top]}
    files = [f.uri for f in store.list_parquet(input)]
    where = locate(sorted(set(t["source_path"].to_pylist())), files, run.manifest.get("input"))
    policy, image_column = figures.read_options(run.manifest)
    classes = list(model.config.classes)
    out = []
    for name, idx in picks.items():
        rows = t.take(idx).to_pylist()
        refs = [(where.get(r["source_path"]) or r["source_path"], int(r["source_row"])) for r in rows]
        pixels, errors = figures.read_pixels(store, refs, model.input_shape, image_column, policy)
        caps = [figures.caption(r, classes, e) for r, e in zip(rows, errors, strict=True)]
        out.append(figures.img(figures.data_uri(figures.gallery(f"latest run {run.run_id}: {name}", pixels, None, caps)), name))
    return out


def section(store: Store, scores: str, model: Any, input: str | None, top: int) -> tuple[list[str], list[dict[str, Any]]]:
    """(HTML, report.json rows) of the runs-over-time section; nothing for a single run."""
    if not is_root(store, scores):
        return [], []
    committed = manifest.committed_runs(store, scores)
    rows = [runs.row(r, LIMITS) for r in committed]
    if not rows:
        return [], []
    body = ["<h2>Runs over time</h2>",
            figures.table(["created", "run", "rows", "errors", "flagged", "expected", "KS", "verdict"],
                    [[r.created, r.run_id, r.rows, r.drift.errors,
                      f"{r.drift.flagged_fraction:.1%}" if r.drift.flagged_fraction is not None else None,
                      f"{r.drift.expected:.1%}" if r.drift.expected is not None else None, r.drift.ks, r.verdict]
                     for r in rows]),
            f'<p class="note">Latest run: {figures.esc(rows[-1].line)}. Verdicts under the default limits of '
            "<code>nrm-ood audit</code>: drift when the flagged fraction exceeds twice the expected rate or the KS "
            f"distance exceeds {LIMITS.max_drift:g}, each beyond chance (p &lt; {LIMITS.alpha:g}).</p>",
            figures.img(figures.data_uri(_over_time(rows)), "flagged fraction and KS distance per run")]
    if input is not None and model is not None:
        body += _latest_gallery(store, model, scores, committed[-1], input, top)
    return body, [r.to_json() for r in rows]
