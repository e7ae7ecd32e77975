"""jobs.stages: the busy fraction, the bound named from stage seconds, and per-row shares that survive re-batching."""

from __future__ import annotations

import pyarrow as pa
import pytest

from jobs.stages import analyse, column, spread, totals

BASE = {"read": 1.0, "decode": 1.0, "wait": 0.0, "h2d": 0.0, "score": 1.0, "d2h": 0.0, "build": 0.0, "write": 0.5}


def test_a_scorer_that_never_waits_is_score_bound() -> None:
    got = analyse({**BASE, "score": 9.0, "wait": 1.0})
    assert (got["busy"], got["bound"]) == (0.9, "score-bound")


def test_a_scorer_waiting_on_slow_decode_is_decode_bound_and_says_raise_read_cpus() -> None:
    got = analyse({**BASE, "wait": 3.0, "decode": 8.0})
    assert got["bound"] == "decode-bound"
    assert got["line"].startswith("scorer busy 25%: decode-bound; raise --read-cpus")


def test_a_scorer_waiting_on_slow_reads_is_read_bound() -> None:
    assert analyse({**BASE, "wait": 3.0, "read": 8.0})["bound"] == "read-bound"


def test_actors_idle_beyond_their_timed_stages_are_start_bound() -> None:
    got = analyse({**BASE, "load": 2.0}, actor_wall=20.0)
    assert (got["busy"], got["bound"]) == (0.05, "start-bound")


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_per_row_shares_sum_to_the_batch_seconds_however_the_rows_are_split(cut: int) -> None:
    t = pa.table({column("score"): spread(2.5, 7), column("read"): spread(0.7, 7)})
    parts = [totals(t.slice(0, cut)), totals(t.slice(cut))]
    assert sum(p["score"] for p in parts) == pytest.approx(2.5)
    assert sum(p["read"] for p in parts) == pytest.approx(0.7)
