"""nrm.batching: a batch size that fits a memory budget (probed), and scoring that halves a batch that
runs out of memory. Out of memory is injected by support.OutOfMemoryAbove, a Runner that raises CUDA's
OutOfMemoryError for the pieces it is told cannot fit; the scoring itself is the real one."""

from __future__ import annotations

import pytest
import torch
from support import OutOfMemoryAbove, tiny_config

import nrm
from nrm.batching import (
    MemoryBudget,
    MemoryBudgetError,
    fit_batch_size,
    out_of_memory,
    peak_bytes,
    probe_batch_size,
    score_in_pieces,
)
from nrm.runner import Runner

SHAPE = (1, 8, 8)


def _model() -> nrm.NRM:
    torch.manual_seed(0)
    return nrm.NRM(tiny_config(*SHAPE[:1], size=SHAPE[1])).eval().requires_grad_(False)


def test_a_piece_that_runs_out_of_memory_is_halved_until_it_fits() -> None:
    model = _model()
    runner = OutOfMemoryAbove(model, limit=5)
    score_in_pieces(runner, torch.randn(20, *SHAPE), model.plan())
    assert runner.scored_rows == [5, 5, 5, 5]


def test_columns_scored_in_halves_equal_those_scored_in_one_piece() -> None:
    model = _model()
    x, plan = torch.randn(20, *SHAPE), model.plan()
    got = score_in_pieces(OutOfMemoryAbove(model, limit=3), x, plan)
    want = Runner(model).score(x, plan)
    assert bool(got.scored.all()) and list(got.cols) == list(want)
    for k, v in want.items():
        torch.testing.assert_close(got.cols[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_pieces_of_the_given_rows_are_scored_in_order() -> None:
    model = _model()
    runner, x, plan = OutOfMemoryAbove(model, limit=100), torch.randn(20, *SHAPE), model.plan(["max_logit"])
    got = score_in_pieces(runner, x, plan, rows=8)
    assert runner.scored_rows == [8, 8, 4]
    torch.testing.assert_close(got.cols["max_logit"], Runner(model).score(x, plan)["max_logit"])


def test_a_row_that_alone_runs_out_of_memory_is_the_only_row_left_unscored() -> None:
    model = _model()
    x, plan = torch.randn(9, *SHAPE), model.plan()
    x[6, 0, 0, 0] = 1234.0
    got = score_in_pieces(OutOfMemoryAbove(model, limit=100, poison=1234.0), x, plan)
    assert got.scored.tolist() == [True] * 6 + [False] + [True] * 2
    assert got.error is not None and got.error.startswith("out of memory scoring one row: CUDA out of memory")
    keep = got.scored
    torch.testing.assert_close(got.cols["latent_loglik"], Runner(model).score(x[keep], plan)["latent_loglik"])


def test_an_error_other_than_out_of_memory_propagates() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"got input of shape \(4, 1, 7, 7\)"):
        score_in_pieces(Runner(model), torch.randn(4, 1, 7, 7), model.plan())


def test_the_cpu_allocators_failure_counts_as_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as e:
        torch.empty(2**60, dtype=torch.uint8)
    assert out_of_memory(e.value)


def test_the_probed_batch_fits_its_budget() -> None:
    model = _model()
    runner, plan = Runner(model), model.plan()
    budget = 4 * peak_bytes(runner, plan, SHAPE, 64)
    rows = probe_batch_size(runner, plan, SHAPE, budget)
    assert rows >= 64 and peak_bytes(runner, plan, SHAPE, rows) <= budget


def test_the_probed_batch_grows_with_the_budget() -> None:
    model = _model()
    runner, plan = Runner(model), model.plan()
    per_8 = peak_bytes(runner, plan, SHAPE, 8)
    rows = [probe_batch_size(runner, plan, SHAPE, per_8 * k) for k in (2, 4, 8, 16)]
    assert rows == sorted(rows) and rows[-1] > rows[0]


def test_a_probe_that_runs_out_of_memory_leaves_one_row_at_a_time() -> None:
    model = _model()
    assert probe_batch_size(OutOfMemoryAbove(model, limit=12), model.plan(), SHAPE, 2**30) == 1


def test_a_full_score_needs_more_memory_than_the_forward_only_columns() -> None:
    model = _model()
    runner = Runner(model)
    full = peak_bytes(runner, model.plan(), SHAPE, 32)
    forward = peak_bytes(runner, model.plan(["max_logit", "energy"], flag=False), SHAPE, 32)
    assert full > forward > 0


def test_the_fitted_batch_is_the_budget_over_the_per_row_bytes_in_multiples_of_8() -> None:
    # peak(n) = 100 n: a budget of 3000 fits 30 rows, rounded down to 24
    assert fit_batch_size({8: 800, 16: 1600}, 3000) == 24


def test_a_fixed_cost_counts_as_per_row_bytes_of_the_larger_probe() -> None:
    # the line 1000 + 100 n fits 90 rows in 10000; 2600 bytes for 16 rows fit 61, rounded down to 56
    assert fit_batch_size({8: 1800, 16: 2600}, 10000) == 56


def test_a_budget_below_one_row_gives_one_row() -> None:
    assert fit_batch_size({8: 1800, 16: 2600}, 500) == 1


def test_the_fitted_batch_is_capped() -> None:
    assert fit_batch_size({8: 1800, 16: 2600}, 10**9, cap=64) == 64


@pytest.mark.parametrize(("text", "size", "fraction"), [
    ("6GiB", 6 * 2**30, None), ("512 MB", 512 * 10**6, None), ("1.5kib", 1536, None), ("80%", None, 0.8),
])
def test_a_memory_budget_is_a_size_or_a_percentage(text: str, size: int | None, fraction: float | None) -> None:
    assert MemoryBudget.parse(text) == MemoryBudget(size, fraction)


def test_a_percentage_budget_is_that_share_of_the_memory_available() -> None:
    assert MemoryBudget.parse("25%").bytes_of(4000) == 1000


@pytest.mark.parametrize(("text", "expected"), [
    ("6", "expected a size with a unit, such as 6GiB or 512MB"),
    ("6 parsecs", "expected a size with a unit, such as 6GiB or 512MB"),
    ("-1GB", "expected a size with a unit"),
    ("lots", "or a percentage such as 80%"),
    ("0%", "expected a percentage above 0% and at most 100%"),
    ("120%", "expected a percentage above 0% and at most 100%"),
    ("0B", "expected at least one byte"),
])
def test_a_bad_memory_budget_names_the_value_and_what_was_expected(text: str, expected: str) -> None:
    with pytest.raises(MemoryBudgetError, match=f"^{text!r} is not a memory budget; .*{expected}"):
        MemoryBudget.parse(text)
