"""Markdown tables of the near/far OOD study (docs/results.md section 6) from `nrm-ood evaluate` outputs.

    python scripts/study_tables.py NAME=EVAL_DIR [NAME=EVAL_DIR ...]
For each network: AUROC / FPR@95 per OOD set and the near / far group means, for the checkpoint's
default (threshold) score and every baseline of the same run; then one summary row per network."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nrm.detectors import PREFIX, REGISTRY  # noqa: E402

SCORES = ["latent_loglik", "max_softmax", "max_logit", "energy", "mahalanobis_feat", "knn", "vim"]
BASELINES = ["max_softmax", "max_logit", "energy", "mahalanobis_feat", "knn", "vim"]
# detectors that add a baseline's feature (Detector.pure set: not pure NRM), as main or candidate columns
FUSED = tuple(PREFIX + cls.name for cls in REGISTRY.values() if getattr(cls, "pure", ""))


def fused(column: str) -> bool:
    return any(column == f or column.startswith(f + "_") for f in FUSED)


def det_columns(m: dict) -> list[str]:
    """The det_* columns of a run, the default (threshold) one first."""
    default = m["threshold"]["score"] if m.get("threshold") else None
    cols = [c for c in m["metrics"][next(iter(m["metrics"]))] if c.startswith("det_")]
    return sorted(cols, key=lambda c: c != default)


def label(sc: str, default: str | None) -> str:
    kind = "NRM + energy" if fused(sc) else "pure NRM"
    return f"{sc} (default, {kind})" if sc == default else (f"{sc} ({kind})" if sc.startswith("det_") else sc)


def pure_column(m: dict) -> str | None:
    return next((c for c in det_columns(m) if not fused(c)), None)


def network_table(name: str, m: dict) -> list[str]:
    sets = list(m["metrics"])
    default = m["threshold"]["score"] if m.get("threshold") else None
    head = "| score | " + " | ".join(f"{s} AUROC / FPR@95" for s in sets) + " | near mean | far mean |"
    lines = [f"**{name}** (in-distribution accuracy on the rows scored: {m['accuracy']['accuracy']:.4f}; "
             f"default score `{default}`)", "", head, "|" + "---|" * (len(sets) + 3)]
    for sc in det_columns(m) + SCORES:
        if sc not in m["metrics"][sets[0]]:
            continue
        cells = [f"{m['metrics'][s][sc]['auroc']:.3f} / {m['metrics'][s][sc]['fpr95']:.3f}" for s in sets]
        groups = [f"{m['groups'][g]['auroc'][sc]:.3f} / {m['groups'][g]['fpr95'][sc]:.3f}" for g in ("near", "far")]
        lines.append(f"| {label(sc, default)} | " + " | ".join(cells + groups) + " |")
    return lines


def summary_row(name: str, m: dict) -> str:
    default, pure = m["threshold"]["score"], pure_column(m)
    out = [name, f"`{default}`"]
    for g in ("near", "far"):
        a = m["groups"][g]["auroc"]
        best = max(BASELINES, key=lambda b: a[b])
        out += [f"{a[default]:.3f}", f"{a[pure]:.3f}" if pure else "-", f"{best} {a[best]:.3f}",
                "yes" if a[default] > a[best] else "no"]
    return "| " + " | ".join(out) + " |"


def main(specs: list[str]) -> None:
    runs = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        runs[name] = json.loads((Path(path) / "metrics.json").read_text())
    print("| network | default score | near: default | near: pure NRM | near: best baseline | default beats it "
          "| far: default | far: pure NRM | far: best baseline | default beats it |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, m in runs.items():
        print(summary_row(name, m))
    for name, m in runs.items():
        print("\n" + "\n".join(network_table(name, m)))


if __name__ == "__main__":
    main(sys.argv[1:])
