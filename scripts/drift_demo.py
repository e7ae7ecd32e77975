"""Three nightly audits on the shared data, and how often clean nights raise a false alarm.

    python scripts/drift_demo.py --model CKPT --work DIR [--shared ../shared] [--nights 500]

CKPT is a CIFAR-10 checkpoint with a fitted threshold (README: convert + fit-detector of the
pretrained ResNet-20). Each night adds its Parquet files to DIR/incoming and runs the real nightly
command, ``nrm-ood score --incremental`` into DIR/audit, then ``nrm-ood audit`` (its exit code is
printed). The nights:

1. 3,000 CIFAR-10 test images (rows 0-2,999);
2. 2,400 CIFAR-10 test images (rows 3,000-5,399) and 600 TinyImageNet val_ood images (20%);
3. 1,200 CIFAR-10 test images (rows 5,400-6,599) and the 1,200 textures32 test images (50%).

Then ``nrm-ood runs`` and ``nrm-ood report`` on DIR/audit. Clean nights: the whole CIFAR-10 test
split is scored once (``nrm-ood score`` into DIR/clean); ``--nights`` nights of 3,000 and of 1,000 rows are
drawn from its rows without replacement (seeded) and given the same statistics and verdict as a
committed run (jobs.drift under the default limits). Committed runs are reused on a second call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import drift  # noqa: E402
from jobs.filtering import read_scores  # noqa: E402
from jobs.storage import Store  # noqa: E402
from nrm.config import Threshold  # noqa: E402

NIGHTS = {  # night -> [(dataset split, first row, rows)]
    "night-1": [("cifar10/test", 0, 3000)],
    "night-2": [("cifar10/test", 3000, 2400), ("tinyimagenet/val_ood", 0, 600)],
    "night-3": [("cifar10/test", 5400, 1200), ("textures32/test", 0, 1200)],
}


def cli(*args: str, check: bool = True) -> int:
    """Run `nrm-ood ARGS` from this checkout; print its output; return its exit code."""
    print("$ nrm-ood " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True)
    print((r.stdout + r.stderr).rstrip(), flush=True)
    if check and r.returncode not in (0,):
        raise SystemExit(f"nrm-ood {args[0]} exited {r.returncode}")
    return r.returncode


def rows_of(split: Path, start: int, n: int) -> pa.Table:
    """Rows [start, start + n) of a shared split (its files in name order), image and label only."""
    t = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in sorted(split.glob("*.parquet"))])
    if start + n > t.num_rows:
        raise SystemExit(f"{split} has {t.num_rows} rows, fewer than {start + n}")
    return t.slice(start, n)


def nightly(work: Path, shared: Path, model: str) -> None:
    incoming, audit = work / "incoming", work / "audit"
    incoming.mkdir(parents=True, exist_ok=True)
    for night, sources in NIGHTS.items():
        for split, start, n in sources:
            path = incoming / f"{night}-{split.split('/')[0]}.parquet"
            if not path.exists():
                pq.write_table(rows_of(shared / "datasets" / split, start, n), path, row_group_size=500)
        cli("score", "--model", model, "--input", str(incoming), "--output", str(audit), "--incremental",
            "--run-id", night, "--batch-size", "256")
        code = cli("audit", str(audit), check=False)
        print(f"audit exit code after {night}: {code}\n", flush=True)
    cli("runs", str(audit))
    cli("report", "--scores", str(audit), "--input", str(incoming), "--out", str(work / "report"))


def clean_nights(work: Path, shared: Path, model: str, nights: int) -> None:
    import nrm

    clean = work / "clean"
    cli("score", "--model", model, "--input", str(shared / "datasets" / "cifar10" / "test"), "--output", str(clean),
        "--run-id", "cifar10-test", "--batch-size", "256")
    t = read_scores(Store(), str(clean / "cifar10-test"), ["status", "ood_score", "is_ood"])
    ok = t.filter(pc.equal(t["status"], "ok"))
    scores = -ok["ood_score"].to_numpy()  # the threshold score
    flagged = ok["is_ood"].to_numpy(zero_copy_only=False)
    th: Threshold | None = nrm.load(model).config.fitted.threshold
    assert th is not None and th.reference is not None
    whole = drift.measure(th, len(scores), t.num_rows - ok.num_rows, int(flagged.sum()),
                          drift.bin_counts(scores, th.reference.quantiles))
    print(f"\nthe whole CIFAR-10 test split as one night: {whole.line(drift.Limits())}")
    rng = np.random.default_rng(0)
    limits = drift.Limits()
    for size in (3000, 1000):
        verdicts, rates, ks, naive = [], [], [], 0
        for _ in range(nights):
            i = rng.choice(len(scores), size, replace=False)
            d = drift.measure(th, size, 0, int(flagged[i].sum()), drift.bin_counts(scores[i], th.reference.quantiles))
            verdicts.append(d.verdict(limits))
            rates.append(d.flagged_fraction)
            ks.append(d.ks)
            naive += int(d.flagged_p is not None and d.flagged_p < limits.alpha)
        alarms = verdicts.count("drift")
        print(f"{nights} clean nights of {size} CIFAR-10 test rows: flagged {np.mean(rates):.2%} on average "
              f"(min {np.min(rates):.2%}, max {np.max(rates):.2%}), KS {np.mean(ks):.3f} on average (max {np.max(ks):.3f}); "
              f"verdicts: drift {alarms} ({alarms / nights:.1%}), shift {verdicts.count('shift')}, "
              f"no drift {verdicts.count('no drift')}; a binomial test alone (p < {limits.alpha:g}) would alert on "
              f"{naive} ({naive / nights:.1%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=Path("../shared"), help="The shared folder (datasets/).")
    ap.add_argument("--nights", type=int, default=500)
    ap.add_argument("--only", choices=["nightly", "clean"], default=None)
    a = ap.parse_args()
    if a.only != "clean":
        nightly(a.work, a.shared, a.model)
    if a.only != "nightly":
        clean_nights(a.work, a.shared, a.model, a.nights)


if __name__ == "__main__":
    main()
