"""Costs of the single ops behind the forward-only pass's choices (docs/benchmarks.md section 7).

    python scripts/op_costs.py [--threads 2] [--reps 30]

On one (512, 16, 32, 32) channels_last float32 activation, best of --reps after a warm-up (jobs.bench.timing), with
freed memory kept as the CLI and the actors keep it (jobs/allocator.py):
- ReLU and residual add, fresh output against in place (what NRM._run does when nothing later reads
  the input);
- the unit statistics of one bias node: from its output z (a positive part, its sum, its sign in place,
  the sign's sum) against from the following ReLU's output (the sum, a sign, its sum), and four ways
  to count the ReLU's open gates per channel;
and, for 512 rows, mahalanobis's float32 quadratic form d^T P d as one D x D product against
nrm.detectors.quadratic_form's symmetric block rows, at ResNet-20's and ResNet-56's gate features."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.allocator import keep_freed_memory  # noqa: E402
from jobs.bench.timing import best_time  # noqa: E402
from nrm.detectors import quadratic_form, symmetric_slabs  # noqa: E402


def stats_from_z(z: torch.Tensor) -> None:
    pos = z.clamp_min(0)
    pos.sum((2, 3))
    pos.sign_()
    pos.sum((2, 3))


def stats_from_relu(r: torch.Tensor) -> None:
    r.sum((2, 3))
    torch.sign(r).sum((2, 3))


def main(reps: int) -> None:
    keep_freed_memory()
    z = torch.randn(512, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    w, r = torch.randn_like(z), torch.relu(z)
    rows = [
        ("relu, fresh output", lambda: torch.relu(z)),
        ("relu, in place", lambda: z.relu_()),  # z >= 0 after the first call: same work, no sign change
        ("add, fresh output", lambda: z + w),
        ("add, in place", lambda: z.add_(w)),
        ("unit statistics from z", lambda: stats_from_z(w)),
        ("unit statistics from the ReLU's output", lambda: stats_from_relu(r)),
        ("gate count: sign, then its sum", lambda: torch.sign(r).sum((2, 3))),
        ("gate count: r > 0, then its sum", lambda: (r > 0).sum((2, 3))),
        ("gate count: count_nonzero", lambda: torch.count_nonzero(r, dim=(2, 3))),
        ("gate count: vector_norm of order 0", lambda: torch.linalg.vector_norm(r, ord=0, dim=(2, 3))),
    ]
    print("op on (512, 16, 32, 32) channels_last float32 | ms")
    for label, fn in rows:
        print(f"{label} | {best_time(fn, reps) * 1e3:.2f}")
    print("quadratic form, 512 rows | D | one D x D product (ms) | symmetric block rows (ms) | blocks")
    for label, dims in (("ResNet-20", 1376), ("ResNet-56", 4064)):
        a = torch.randn(dims, dims, dtype=torch.float64)
        p = a @ a.T / dims + torch.eye(dims, dtype=torch.float64)
        d, p32, slabs = torch.randn(512, dims), p.float(), symmetric_slabs(p)
        full = best_time(lambda: ((d @ p32) * d).sum(1), reps) * 1e3  # noqa: B023
        blocked = best_time(lambda: quadratic_form(d, slabs), reps) * 1e3  # noqa: B023
        print(f"{label} | {dims} | {full:.1f} | {blocked:.1f} | {len(slabs)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions (default 30)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    main(a.reps)
