"""What the default fitted detector adds to `model.score` (docs/benchmarks.md section 1): the rows
of `nrm-ood bench` section 1 for two presets, without the rest of the benchmark.

    python scripts/detector_cost.py [--batch 512] [--reps 7]
"""

from __future__ import annotations

import argparse

import nrm
from jobs.bench.speed import overhead
from nrm.names import DEFAULT_DETECTOR, DEFAULT_FEATURES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    print(f"| model | plain (ms) | NRM score, no detector (ms) | NRM score + {DEFAULT_DETECTOR}[{DEFAULT_FEATURES}] (ms) "
          "| detector adds |\n|---|---|---|---|---|")
    for name, width in (("gray28", 0.5), ("rgb32-small", 1.0)):
        r = overhead(nrm.preset(name, width), a.batch, a.reps)
        print(f"| {name} w{width} | {r['plain_s'] * 1e3:.1f} | {r['score_s'] * 1e3:.1f} ({r['ratio']:.2f}x) | "
              f"{r['detector_s'] * 1e3:.1f} ({r['detector_ratio']:.2f}x) | {r['detector_s'] / r['score_s'] - 1:+.0%} |",
              flush=True)


if __name__ == "__main__":
    main()
