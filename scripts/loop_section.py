"""Section 3a of `nrm-ood bench` alone: the job against the single-process loop and the in-memory
scorer (jobs/bench/loop.py), without sections 3-5's 1x and 10x job runs.

    python scripts/loop_section.py [--rows 60000] [--batch 512] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.bench.loop import loop_section  # noqa: E402
from jobs.pipeline import init_ray  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = ap.parse_args()
    init_ray(None)
    with tempfile.TemporaryDirectory(prefix="nrm-bench-") as tmp:
        lines = loop_section(Path(tmp), args.rows, args.batch, args.shared if args.shared.is_dir() else None, print)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
