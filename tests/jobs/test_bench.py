"""jobs.bench: the scoring-overhead measurement (the rest of `nrm-ood bench` is timing, run by hand)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support import tiny_config

import jobs.bench
from jobs.bench import overhead


def test_overhead_pairs_each_timing_with_its_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timings 2 s (plain), 3 s (scored), 5 s (scored with the detector) go to their own fields."""
    timings = iter([2.0, 3.0, 5.0])
    calls: list[int] = []

    def fake_time(fn: Callable[[], Any], reps: int) -> float:
        fn()  # the real plain / scored passes still run once each
        calls.append(reps)
        return next(timings)

    monkeypatch.setattr(jobs.bench, "_time", fake_time)
    r = overhead(tiny_config(), batch=8, reps=3)
    assert calls == [3, 3, 3]
    assert r == {"plain_s": 2.0, "score_s": 3.0, "ratio": 1.5, "images_per_s": 8 / 3.0, "detector_s": 5.0,
                 "detector_ratio": 2.5}
