"""jobs.bench: the scoring-overhead measurement (the rest of `nrm-ood bench` is timing, run by hand)."""

from __future__ import annotations

from support import tiny_config

from jobs.bench import overhead


def test_overhead_times_plain_nrm_and_the_default_detector() -> None:
    r = overhead(tiny_config(), batch=8, reps=1)
    assert set(r) == {"plain_s", "score_s", "ratio", "images_per_s", "detector_s", "detector_ratio"}
    assert all(v > 0 for v in r.values())
    assert r["ratio"] == r["score_s"] / r["plain_s"] and r["detector_ratio"] == r["detector_s"] / r["plain_s"]
    assert r["images_per_s"] == 8 / r["score_s"]
