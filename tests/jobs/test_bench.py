"""jobs.bench: the scoring-overhead measurement (the rest of `nrm-ood bench` is timing, run by hand)."""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import pytest
from support import tiny_config

import nrm
from jobs.bench import timing
from jobs.bench.speed import overhead


def test_overhead_pairs_each_timing_with_its_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain takes the fastest of its four variants (as given / BN fused, either memory format); each
    score measurement the faster of its two formats; every timing lands in its own field."""
    timings = iter([4.0, 2.0, 3.0, 5.0,  # plain: as given, channels_last, BN fused, fused channels_last
                    7.0, 6.0,            # full score: contiguous, channels_last
                    2.4, 2.2,            # forward-only columns
                    2.1, 2.3,            # the classifier's columns
                    3.0, 4.0])           # post-hoc baselines
    calls: list[int] = []

    def fake_time(fn: Callable[[], Any], reps: int) -> float:
        fn()  # the real passes still run once each
        calls.append(reps)
        return next(timings)

    monkeypatch.setattr(timing, "best_time", fake_time)
    model = nrm.NRM(tiny_config()).eval().requires_grad_(False)
    r = overhead(model, model, batch=8, reps=3)
    assert calls == [3] * 12
    assert (r["plain_s"], r["plain"]) == (2.0, "as given, channels_last")
    assert (r["score_s"], r["score_ratio"], r["forward_s"], r["forward_ratio"]) == (6.0, 3.0, 2.2, 1.1)
    assert (r["classifier_s"], r["classifier_ratio"]) == (2.1, 1.05)
    assert (r["baselines_s"], r["images_per_s"]) == (3.0, 8 / 6.0)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="freed memory is kept with glibc's mallopt")
def test_the_report_says_the_process_keeps_freed_memory() -> None:
    from jobs.bench import run

    text = run(None, 1, 1, 1, lambda s: None, "nrm-ood bench", sections=())
    assert "Freed memory kept in the process (jobs/allocator.py)." in text


def test_the_model_filter_keeps_only_the_labels_that_contain_it() -> None:
    from jobs.bench.speed import bench_models

    labels = [label for label, _, _ in bench_models("cpu", None, ("gray28",))]
    assert labels == ["gray28 w0.5", "gray28 w1.0"]
