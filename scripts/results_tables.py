"""Markdown tables for docs/results.md from `nrm-ood evaluate` outputs (their metrics.json).

    python scripts/results_tables.py EVAL_DIR [EVAL_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEY = ["latent_loglik", "latent_prior", "loglik_bound", "recon_sq_error", "max_softmax", "max_logit", "energy"]


def table(path: Path) -> str:
    m = json.loads((path / "metrics.json").read_text())
    sets = [s for s in m["metrics"]]
    cols = KEY + sorted({c for s in sets for c in m["metrics"][s] if c.startswith("det_")})
    lines = [f"**{m['model']['uri']}** (model_id `{m['model']['model_id'][:12]}`), in-distribution "
             f"`{m['sets']['in']['input']}` ({m['sets']['in']['ok']} rows), test accuracy "
             f"{m['accuracy']['accuracy']:.4f}", "",
             "| score | " + " | ".join(f"{s} AUROC / FPR@95" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for c in cols:
        cells = []
        for s in sets:
            r = m["metrics"][s].get(c)
            cells.append(f"{r['auroc']:.3f} / {r['fpr95']:.3f}" if r else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(table(Path(p)) for p in sys.argv[1:]))
