"""`nrm-ood evaluate`: score an in-distribution set and named OOD sets with the Ray job, then measure.

Every set goes through ``jobs.pipeline.run_score`` into ``<out>/scores`` under run id ``in`` or
``ood-<NAME>``; a committed run is reused (after checking that it was made from the same checkpoint
and input), so a re-run with one more ``--ood`` scores only the new set. Then, on the rows with
``status == "ok"``:

* ``metrics.json`` / ``metrics.md``: AUROC, AUPR-in, AUPR-out, FPR@95TPR and detection error
  (nrm.metrics: in-distribution = positive, scores oriented higher = in-distribution) for every
  score column and every OOD set, the direction each score was used in, the classifier's accuracy
  on labelled in-distribution rows, row counts and error rows;
* near / far groups (OpenOOD style: ``--near NAME=URI`` and ``--far NAME=URI``; ``--ood`` sets stay
  ungrouped): for each group, the mean AUROC and mean FPR@95TPR over its sets for every score column
  (``nrm.metrics.group_means``; a score missing on any set of the group has no mean), in
  ``metrics.json`` ("groups"), ``metrics.md``, ``report.html`` and on screen;
* ``report.html``, self-contained (figures embedded as ``data:`` URIs; the same PNGs also in
  ``figures/``): score histograms, ROC curves, AUROC by layer of the per-layer latent terms, and
  galleries of the most and least OOD rows of each set (by the ``ood_score`` column) with the
  model's rendering h(0) under each image. Tables list the checkpoint's threshold score (the one
  that decides ``is_ood``) first, marked.

``--limit N`` keeps the first N rows of each set: files in sorted URI order (as the job lists
them), rows in file order, copied to ``<out>/inputs/<name>.parquet`` (with ``<name>.json`` saying
where they came from), and that copy is what gets scored.

Modules: ``sets`` (the options, --limit copies, scoring the sets), ``metrics`` (pure metrics of the
scored tables, and metrics.md), ``page`` (report.html and its figures), ``run`` (``evaluate`` and
its summary).
"""

from jobs.evaluate.metrics import (
    CONVENTION,
    accuracy,
    error_reasons,
    metrics_markdown,
    metrics_table,
    ok_mask,
    score_columns,
)
from jobs.evaluate.page import GALLERY, extreme_rows, write_evaluation
from jobs.evaluate.run import evaluate, summary
from jobs.evaluate.sets import (
    EvalOptions,
    EvalResult,
    EvaluateError,
    ScoredSet,
    group_sets,
    limited_copy,
    parse_ood,
)

__all__ = ["CONVENTION", "GALLERY", "EvalOptions", "EvalResult", "EvaluateError", "ScoredSet", "accuracy",
           "error_reasons", "evaluate", "extreme_rows", "group_sets", "limited_copy", "metrics_markdown",
           "metrics_table", "ok_mask", "parse_ood", "score_columns", "summary", "write_evaluation"]
