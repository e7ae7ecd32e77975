"""The default-detector study (docs/study-default-detector.md), from scripts/study_cache.py's cache.

    python scripts/study_rule.py validation NAME=CKPT:IN_SET [...] --cache DIR --out DIR  # validation sets only
    python scripts/study_rule.py choices VALIDATION.CSV [...] [--cache DIR]              # the decision
    python scripts/study_rule.py report NAME=CKPT:IN_SET [...] --cache DIR --out DIR      # the report tables
    python scripts/study_rule.py summary REPORT.CSV [...]                                 # one row per network

``validation`` fits every candidate of the design (fitting rows x detector x features) and writes
OUT/validation.csv (network, candidate, set, AUROC; in-distribution = half B of the held-out rows;
real and synthetic validation OOD sets). It never reads a report split. ``choices`` prints the fixed-
rule criterion (mean over networks of the worst-case real-validation AUROC), the synthetic-choice
agreement tables and, with ``--cache``, the decision of the design's section 4 (``decide``).
``report`` applies the rule (``rule``: fixed in the design's section 4b before this stage ran) beside
its pure NRM detector, the fixed-rule fallback, today's default, the study's flow and the post-hoc
baselines, and writes OUT/report.csv and OUT/report.md. CKPT is only read for the classifier head
(the baselines' ViM needs it).
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nrm  # noqa: E402
from nrm import detectors as D  # noqa: E402
from nrm import metrics  # noqa: E402
from nrm.fit import fit_baselines  # noqa: E402

Cols = dict[str, Tensor]
Score = Callable[[Cols], Tensor]
ROWS = ("half", "train20k", "train")
DETECTORS = (("mahalanobis", "gates"), ("mahalanobis", "gates_acts"),
             ("mahalanobis_energy", "gates"), ("mahalanobis_energy", "gates_acts"),
             ("mahalanobis_energy_robust", "gates"), ("mahalanobis_energy_robust", "gates_acts"))
CHUNK = 4096
PARTS = {"gates": "latent_gates", "acts": "unit_acts"}  # the cached column of each forward feature part


# ---------------------------------------------------------------------------- cache
def load(cache: Path, report: bool) -> dict[str, Cols]:
    """The cached splits of one network; the report splits (test_*) only when ``report``."""
    return {p.stem: torch.load(p) for p in sorted(cache.glob("*.pt")) if report or not p.stem.startswith("test_")}


def rows(cols: Cols, idx: Tensor) -> Cols:
    return {k: v[idx] for k, v in cols.items()}


def halves(held: Cols) -> tuple[Tensor, Tensor]:
    """Half A (fits the `half` candidates) and half B (validation in-distribution) of the held-out rows."""
    return D.split_halves(len(held["pred"]))


def fitting_rows(splits: dict[str, Cols], which: str) -> Cols:
    if which == "half":
        return rows(splits["held"], halves(splits["held"])[0])
    if which == "train20k":
        return rows(splits["train"], torch.arange(min(20000, len(splits["train"]["pred"]))))
    return splits["train"]


# ---------------------------------------------------------------------------- detectors
def gaussian(cols: Cols, features: str, n_classes: int) -> dict[str, Tensor]:
    """nrm.detectors.fit_mahalanobis, in chunks of rows (ResNet-56's 8,128 gates_acts features on
    45,000 rows would not fit in memory at once): class means at the predicted class (the pooled
    mean for a class never predicted) and the inverse of the pooled covariance, ridge 1e-6 trace / D."""
    n = len(cols["pred"])
    pred = cols["pred"].long()
    parts = ("pred", *(PARTS[p] for p in features.split("_")))
    chunks = [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
    feat = lambda a, b: D.features({k: cols[k][a:b] for k in parts}, features)  # noqa: E731
    d = feat(0, 1).shape[1]
    sums, total = torch.zeros(n_classes, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for a, b in chunks:
        f = feat(a, b)
        sums.index_add_(0, pred[a:b], f)
        total += f.sum(0)
    counts = torch.bincount(pred, minlength=n_classes).double()
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], total / n)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for a, b in chunks:
        c = feat(a, b) - means[pred[a:b]]
        cov += c.T @ c
    cov /= max(1, n - 1)
    ridge = 1e-6 * float(cov.trace()) / d + 1e-12
    return {"means": means, "precision": torch.linalg.inv(cov + ridge * torch.eye(d, dtype=torch.float64))}


def library_detector(name: str, features: str, fitted: dict[str, Tensor]) -> D.Detector:
    """The library's detector object for fitted tensors: the one place this script builds one."""
    return D.lookup(name).from_tensors(fitted, features=features)


def fit(name: str, features: str, cols: Cols, n_classes: int) -> Score:
    """A fitted candidate's score function (higher = in-distribution), fitted as nrm.detectors fits it."""
    if name == "mahalanobis":
        return library_detector(name, features, gaussian(cols, features, n_classes)).score
    if name not in ("mahalanobis_energy", "mahalanobis_energy_robust"):
        raise ValueError(f"unknown candidate detector {name!r}")
    # MahalanobisEnergy.fit: the Gaussian on a seeded four fifths, both parts standardised on the rest, refit on all
    n = len(cols["pred"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cut = n * 4 // 5
    part = library_detector("mahalanobis", features, gaussian(rows(cols, perm[:cut]), features, n_classes))
    rest = rows(cols, perm[cut:])
    both = torch.stack([part.score(rest).double(), -rest["energy"].double()], 1)  # (n - cut, 2)
    if name == "mahalanobis_energy":  # mean and standard deviation
        centre, scale = both.mean(0), both.std(0)
    else:  # median and 1.4826 x the median absolute deviation: one far row cannot shrink a part's weight
        centre = both.median(0).values
        scale = 1.4826 * (both - centre).abs().median(0).values
    fitted = {**gaussian(cols, features, n_classes), "centre": centre, "scale": scale.clamp_min(1e-12)}
    return library_detector("mahalanobis_energy", features, fitted).score


# ---------------------------------------------------------------------------- metrics
def oriented(cols: Cols, name: str) -> Tensor:
    v = cols[name].double()
    return v if nrm.scores.HIGHER_IS_IN[name] else -v


def auroc(score: Score, pos: Cols, neg: Cols) -> float:
    return float(metrics.auroc(score(pos).double().numpy(), score(neg).double().numpy()))


def ood_sets(splits: dict[str, Cols], prefix: str) -> dict[str, Cols]:
    return {k[len(prefix):]: v for k, v in splits.items() if k.startswith(prefix)}


@dataclass
class Net:
    name: str
    ckpt: str
    splits: dict[str, Cols]

    @property
    def classes(self) -> int:
        return int(self.splits["train"]["logits"].shape[1])


# ---------------------------------------------------------------------------- validation stage
def validation(nets: list[Net], out: Path) -> None:
    table: list[dict[str, Any]] = []
    for net in nets:
        s = net.splits
        in_val = rows(s["held"], halves(s["held"])[1])
        oods = {**{f"real:{k}": v for k, v in ood_sets(s, "val_").items()},
                **{f"syn:{k}": v for k, v in ood_sets(s, "syn_").items()}}
        for r in ROWS:
            fit_cols = fitting_rows(s, r)
            for name, fs in DETECTORS:
                score = fit(name, fs, fit_cols, net.classes)
                for k, v in oods.items():
                    table.append({"network": net.name, "candidate": f"{r}:{name}[{fs}]", "set": k,
                                  "auroc": auroc(score, in_val, v)})
                print(f"{net.name} {r}:{name}[{fs}] " + " ".join(
                    f"{t['set']} {t['auroc']:.3f}" for t in table[-len(oods):]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "validation.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["network", "candidate", "set", "auroc"])
        w.writeheader()
        w.writerows({**t, "auroc": f"{t['auroc']:.4f}"} for t in table)
    print_choices(table)


def read_tables(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        with open(p) as fh:
            out += [{**r, "auroc": float(r["auroc"])} for r in csv.DictReader(fh)]
    return out


def worst(table: list[dict[str, Any]], net: str, cand: str, kind: str, agg: Callable[[list[float]], float] = min) -> float:
    return agg([t["auroc"] for t in table if t["network"] == net and t["candidate"] == cand and t["set"].startswith(kind)])


def simplicity(cand: str) -> tuple[int, int, int]:
    """The design's tie-break order (section 4): pure before fused, fewer features, fewer rows."""
    r, _, det = cand.partition(":")
    name, _, fs = det.partition("[")
    return ([d for d, _ in DETECTORS].index(name), fs.count("_"), ROWS.index(r))


def decide(table: list[dict[str, Any]], dims: dict[str, tuple[int, int]]) -> None:
    """Section 4's decision on the validation table: the fixed rule (best mean over networks of the
    worst-case real-validation AUROC; within 0.002 the simpler candidate), the rows part as a function
    of D / n (every threshold between the networks' ratios), and the one-synthetic-set hypothesis
    (patches) against the fixed rule. ``dims``: network -> (unit channels C, held-out rows n); the
    gates features have D = C, gates_acts D = 2C."""
    nets = list(dict.fromkeys(t["network"] for t in table))
    cands = list(dict.fromkeys(t["candidate"] for t in table))
    crit = {c: float(np.mean([worst(table, n, c, "real:") for n in nets])) for c in cands}
    top = max(crit.values())
    fixed = min((c for c in cands if crit[c] >= top - 0.002), key=simplicity)
    print(f"\n### The rule\n\nfixed rule: {fixed} (mean worst case {crit[fixed]:.4f}; best {top:.4f})")
    for det in dict.fromkeys(c.partition(":")[2] for c in cands):
        ratio = {n: dims[n][0] * (2 if det.endswith("gates_acts]") else 1) / dims[n][1] for n in nets}
        for big in ("train20k", "train"):
            best = max((float(np.mean([worst(table, n, f"{big if ratio[n] > t else 'half'}:{det}", "real:") for n in nets])), t)
                       for t in [0.0, *sorted(set(ratio.values()))])
            print(f"- rows by D / n for {det}: {big} when D / n > {best[1]:.3f}, else half: mean {best[0]:.4f}")
    patches = {n: max(cands, key=lambda c, n=n: worst(table, n, c, "syn:patches")) for n in nets}
    got = {n: worst(table, n, patches[n], "real:") for n in nets}
    regret = {n: max(worst(table, n, c, "real:") for c in cands) - got[n] for n in nets}
    print("\nchoice on the patch-shuffled set alone: " + "; ".join(
        f"{n} {patches[n]} (real worst case {got[n]:.3f}, regret {regret[n]:.3f})" for n in nets))
    print(f"mean real worst case {np.mean(list(got.values())):.4f} against the fixed rule's {crit[fixed]:.4f}")


def print_choices(table: list[dict[str, Any]]) -> None:
    nets = list(dict.fromkeys(t["network"] for t in table))
    cands = list(dict.fromkeys(t["candidate"] for t in table))
    print("\n### Worst-case real-validation AUROC\n")
    print("| candidate | " + " | ".join(nets) + " | mean |\n|---|" + "---|" * (len(nets) + 1))
    crit = {c: float(np.mean([worst(table, n, c, "real:") for n in nets])) for c in cands}
    for c in sorted(cands, key=crit.__getitem__, reverse=True):
        print(f"| {c} | " + " | ".join(f"{worst(table, n, c, 'real:'):.3f}" for n in nets) + f" | {crit[c]:.3f} |")
    print("\n### Synthetic choice against the real-validation choice\n")
    print("| network | real winner (worst case) | synthetic winner, worst case | its real worst case, regret "
          "| synthetic winner, mean | its real worst case, regret |\n|---|---|---|---|---|---|")
    for n in nets:
        real = max(cands, key=lambda c: worst(table, n, c, "real:"))
        best = worst(table, n, real, "real:")
        cells = [n, f"{real} ({best:.3f})"]
        for agg in (min, lambda v: float(np.mean(v))):
            syn = max(cands, key=lambda c, agg=agg: worst(table, n, c, "syn:", agg))
            got = worst(table, n, syn, "real:")
            cells += [syn, f"{got:.3f}, {best - got:.3f}"]
        print("| " + " | ".join(cells) + " |")
    syn = sorted({t["set"] for t in table if t["set"].startswith("syn:")})
    print("\n### Regret of choosing on one synthetic set alone (real worst case lost; exploratory)\n")
    print("| synthetic set | " + " | ".join(nets) + " | max |\n|---|" + "---|" * (len(nets) + 1))
    for one in syn:
        reg = []
        for n in nets:
            real = max(worst(table, n, c, "real:") for c in cands)
            pick = max(cands, key=lambda c, n=n, one=one: worst(table, n, c, one))
            reg.append(real - worst(table, n, pick, "real:"))
        print(f"| {one[4:]} | " + " | ".join(f"{r:.3f}" for r in reg) + f" | {max(reg):.3f} |")


# ---------------------------------------------------------------------------- report stage
NEAR = {"cifar10": ("tin",), "gray": ("mnist", "fashion_mnist")}
BASELINES = ("max_softmax", "max_logit", "energy", "mahalanobis_feat", "knn", "vim")


FIXED = ("train20k", "mahalanobis_energy_robust", "gates_acts")  # the rule's fallback (design section 4b)
PICK: dict[str, tuple[str, str, str]] = {}  # --pick: network -> the rule's pick printed by an earlier run
SKIP: set[str] = set()  # --skip: name[features] of SEARCH left out of the study's flow


def rule(net: Net) -> tuple[tuple[str, str, str], Score, dict[str, float]]:
    """The default rule of docs/study-default-detector.md section 4b, as fit-detector applies it with
    no --val-ood: every (fitting rows, detector, features) of ROWS x DETECTORS, the highest AUROC of
    half B of the held-out rows against the patch-shuffled training rows (validation splits only);
    an exact tie goes to the first in that order. Returns the winner, its score and the table."""
    s = net.splits
    in_val = rows(s["held"], halves(s["held"])[1])
    best: tuple[float, tuple[str, str, str], Score] | None = None
    table: dict[str, float] = {}
    for r in ROWS:
        fit_cols = fitting_rows(s, r)
        for name, fs in DETECTORS:
            score = fit(name, fs, fit_cols, net.classes)
            a = table[f"{r}:{name}[{fs}]"] = auroc(score, in_val, s["syn_patches"])
            if best is None or a > best[0]:
                best = (a, (r, name, fs), score)
    assert best is not None
    print(f"{net.name}: the rule picks {best[1]} (patch-shuffled AUROC {best[0]:.4f})", flush=True)
    return best[1], best[2], table


def pure(det: tuple[str, str, str]) -> tuple[str, str, str]:
    """The pure NRM detector beside a fused one: the Gaussian alone, same rows and features."""
    r, _, fs = det
    return (r, "mahalanobis", fs)


def study_flow(net: Net) -> tuple[str, Score, dict[str, float]]:
    """docs/results.md section 6's flow (`--val-ood` real validation sets, `--detector-rows 20000`):
    nrm.detectors.choose over SEARCH. The candidates on forward statistics are fitted on the first
    20,000 training rows with every held-out row as the in-distribution side; those that need the
    top-down pass on half A of the held-out rows against half B (the training rows are cached from
    the forward pass only). Returns the winner's name, score and validation table."""
    s = net.splits
    a, b = halves(s["held"])
    oods = ood_sets(s, "val_")
    best: tuple[tuple[float, float], str, Score, dict[str, float]] | None = None
    for name, fs in D.SEARCH:
        if f"{name}[{fs}]" in SKIP:
            continue
        forward = set(fs.split("_")) <= set(PARTS)
        if name in ("mahalanobis", "mahalanobis_energy") and forward:
            score = fit(name, fs, fitting_rows(s, "train20k"), net.classes)
        else:
            score = D.lookup(name)(fs).fit(rows(s["held"], a) if not forward else fitting_rows(s, "train20k"),
                                           net.classes).score
        pos = s["held"] if forward else rows(s["held"], b)
        res = {k: auroc(score, pos, v) for k, v in oods.items()}
        key = (min(res.values()), float(np.mean(list(res.values()))))
        if best is None or key > best[0]:
            best = (key, f"{name}[{fs}]", score, res)
    assert best is not None
    return best[1], best[2], best[3]


def baselines(net: Net) -> dict[str, Score]:
    """MSP, max logit, energy (columns) and the post-hoc detectors fitted on every training row with
    its label, as `fit-detector --baselines` (nrm.fit.fit_baselines: Mahalanobis on the penultimate
    features, KNN k = 50, ViM)."""
    t = net.splits["train"]
    as_rows = lambda cols: {"penultimate": cols["feats"], "logits": cols["logits"]}  # noqa: E731
    fitted = fit_baselines({**as_rows(t), "label": t["label"]}, nrm.load(net.ckpt).head())
    out: dict[str, Score] = {c: (lambda cols, c=c: oriented(cols, c)) for c in BASELINES[:3]}
    for d in fitted:
        out[d.column] = lambda cols, d=d: d.score(as_rows(cols))
    return out


def report_scores(net: Net) -> dict[str, Score]:
    s = net.splits
    if net.name in PICK:  # the pick an earlier run of rule() printed for this network
        det = PICK[net.name]
        default = fit(det[1], det[2], fitting_rows(s, det[0]), net.classes)
    else:
        det, default, _ = rule(net)
    label = lambda d: f"{d[0]}:{d[1]}[{d[2]}]"  # noqa: E731
    scores: dict[str, Score] = {f"default (the rule): {label(det)}": default}
    if pure(det) != det:
        p = pure(det)
        scores[f"pure NRM: {label(p)}"] = fit(p[1], p[2], fitting_rows(s, p[0]), net.classes)
    if det != FIXED:
        scores[f"fixed rule (fallback): {label(FIXED)}"] = fit(FIXED[1], FIXED[2], fitting_rows(s, FIXED[0]), net.classes)
    scores["today's default: half:mahalanobis[gates_acts]"] = fit("mahalanobis", "gates_acts",
                                                                  fitting_rows(s, "half"), net.classes)
    name, score, _ = study_flow(net)
    scores[f"study's flow: train20k:{name}"] = score
    scores["latent_loglik"] = lambda cols: oriented(cols, "latent_loglik")
    scores.update(baselines(net))
    return scores


def report(nets: list[Net], in_sets: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    table: list[dict[str, Any]] = []
    for net in nets:
        s = net.splits
        tests = ood_sets(s, "test_")
        pos = tests.pop("in")
        near = NEAR["cifar10" if in_sets[net.name] == "cifar10" else "gray"]
        groups = {"near": [k for k in tests if k in near], "far": [k for k in tests if k not in near and k != "tinjpeg"]}
        acc = float((s["test_in"]["pred"] == s["test_in"]["label"]).double().mean())
        lines += ["", f"**{net.name}** (accuracy on the 2,000 in-distribution rows: {acc:.4f}; near: "
                  f"{', '.join(groups['near'])}; far: {', '.join(groups['far'])})", "",
                  "| score | " + " | ".join(f"{k} AUROC / FPR@95" for k in tests) + " | near mean | far mean |",
                  "|---|" + "---|" * (len(tests) + 2)]
        for label, score in report_scores(net).items():
            sp = score(pos).double().numpy()
            cell = {}
            for k, v in tests.items():
                sn = score(v).double().numpy()
                cell[k] = (float(metrics.auroc(sp, sn)), float(metrics.fpr_at_tpr(sp, sn, 0.95)))
                table.append({"network": net.name, "score": label, "set": k, "auroc": f"{cell[k][0]:.4f}",
                              "fpr95": f"{cell[k][1]:.4f}"})
            g = {n: tuple(float(np.mean([cell[k][j] for k in ks])) for j in (0, 1)) for n, ks in groups.items()}
            lines.append(f"| {label} | " + " | ".join(f"{a:.3f} / {f:.3f}" for a, f in [*cell.values(), g["near"], g["far"]])
                         + " |")
            print(lines[-1], flush=True)
    with open(out / "report.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["network", "score", "set", "auroc", "fpr95"])
        w.writeheader()
        w.writerows(table)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def summary(paths: list[Path]) -> None:
    """One row per network from report stages' report.csv: near / far group means (AUROC, FPR@95) of
    the default flow, its pure NRM detector, today's default, the study's flow and the best baseline
    of each group, and the goals of issue 32 (near >= 0.92, far >= 0.97, above every baseline, pure
    NRM >= KNN)."""
    rows = read_tables(paths)
    print("| network | default flow | near AUROC / FPR@95 | far AUROC / FPR@95 | pure NRM near / far | KNN near / far "
          "| best baseline near | best baseline far | today's default near / far | study's flow near / far "
          "| goals missed |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for net in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == net]
        near = NEAR["cifar10"] if any(r["set"] == "tin" for r in mine) else NEAR["gray"]
        group = functools.partial(_group, mine, near)
        default = next(r["score"] for r in mine if r["score"].startswith("default"))
        pure_label = next((r["score"] for r in mine if r["score"].startswith("pure NRM")), default)
        today = next(r["score"] for r in mine if r["score"].startswith("today"))
        study = next(r["score"] for r in mine if r["score"].startswith("study"))
        best = {g: max(BASELINES, key=lambda b, g=g: group(b, g)) for g in ("near", "far")}
        missed = []
        for g, goal in (("near", 0.92), ("far", 0.97)):
            if group(default, g) < goal:
                missed.append(f"{g} {group(default, g):.3f} < {goal} by {goal - group(default, g):.3f}")
            if group(default, g) <= group(best[g], g):
                missed.append(f"{g}: {best[g]} {group(best[g], g):.3f} >= default {group(default, g):.3f}")
            if group(pure_label, g) < group("knn", g):
                missed.append(f"{g}: pure NRM below KNN by {group('knn', g) - group(pure_label, g):.3f}")
        pair = lambda sc, group=group: f"{group(sc, 'near'):.3f} / {group(sc, 'far'):.3f}"  # noqa: E731
        print(f"| {net} | `{default.split(': ', 1)[1]}` | {group(default, 'near'):.3f} / {group(default, 'near', 'fpr95'):.3f} "
              f"| {group(default, 'far'):.3f} / {group(default, 'far', 'fpr95'):.3f} | {pair(pure_label)} | {pair('knn')} "
              f"| {best['near']} {group(best['near'], 'near'):.3f} | {best['far']} {group(best['far'], 'far'):.3f} "
              f"| {pair(today)} | {pair(study)} | {'; '.join(missed) or 'none'} |")


def _group(rows: list[dict[str, Any]], near: tuple[str, ...], score: str, g: str, col: str = "auroc") -> float:
    """The mean of ``col`` over the near or far sets (``g``) of one score of one network's rows."""
    return float(np.mean([float(r[col]) for r in rows if r["score"] == score and (r["set"] in near) == (g == "near")
                          and r["set"] != "tinjpeg"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["validation", "choices", "report", "summary"])
    ap.add_argument("networks", nargs="+", help="NAME=CKPT:IN_SET (the cache is CACHE/NAME); for choices: "
                                                "validation.csv files")
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--detectors", help="comma-separated name[features] subset of DETECTORS (validation stage)")
    ap.add_argument("--pick", action="append", default=[], metavar="NAME=ROWS:DETECTOR[FEATURES]",
                    help="report: fit this pick of the rule (printed by an earlier run) instead of choosing again")
    ap.add_argument("--skip", action="append", default=[], metavar="DETECTOR[FEATURES]",
                    help="report: leave this candidate of nrm.detectors.SEARCH out of the study's flow")
    a = ap.parse_args()
    for spec in a.pick:
        net, _, cand = spec.partition("=")
        r, _, det = cand.partition(":")
        PICK[net] = (r, det.partition("[")[0], det.partition("[")[2].rstrip("]"))
    SKIP.update(a.skip)
    if a.stage == "summary":  # the networks are report.csv files
        summary([Path(p) for p in a.networks])
        return
    if a.stage == "choices":
        table = read_tables([Path(p) for p in a.networks])
        print_choices(table)
        if a.cache:  # the feature count and held-out rows of each network, for the rule's rows part
            held = {n: torch.load(a.cache / n / "held.pt") for n in dict.fromkeys(t["network"] for t in table)}
            decide(table, {n: (h["latent_gates"].shape[1], len(h["pred"])) for n, h in held.items()})
        return
    if a.detectors:
        global DETECTORS
        want = a.detectors.split(",")
        DETECTORS = tuple(d for d in DETECTORS if f"{d[0]}[{d[1]}]" in want)
    nets, in_sets = [], {}
    for spec in a.networks:
        name, _, rest = spec.partition("=")
        ckpt, _, in_set = rest.rpartition(":")
        in_sets[name] = in_set
        nets.append(Net(name, ckpt, load(a.cache / name, report=a.stage == "report")))
    if a.stage == "validation":
        validation(nets, a.out)
    else:
        report(nets, in_sets, a.out)


if __name__ == "__main__":
    main()
