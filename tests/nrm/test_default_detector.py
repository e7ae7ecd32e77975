"""nrm.detectors.default: the detector a user without validation OOD data gets, and
nrm.detectors.mahalanobis_energy_robust, which it may pick."""

from __future__ import annotations

import torch
from support import tiny_config

import nrm
from nrm import detectors as D
from nrm.detectors import default
from nrm.fit import refit_default
from nrm.metrics import threshold_at_tpr


def _cols(seed: int, n: int, shift_gates: float = 0.0, shift_energy: float = 0.0) -> dict[str, torch.Tensor]:
    """Forward-pass score columns over 3 classes whose gate rates and energy can be moved apart."""
    g = torch.Generator().manual_seed(seed)
    return {"pred": torch.randint(3, (n,), generator=g), "latent_gates": torch.rand(n, 3, generator=g) + shift_gates,
            "unit_acts": torch.randn(n, 3, generator=g).abs(), "energy": torch.randn(n, generator=g) + shift_energy}


def _choose(shuffled: dict[str, torch.Tensor] | None) -> default.DefaultChoice:
    return default.choose_default(_cols(0, 400), _cols(1, 900), shuffled, D.Head(3))


def test_the_rule_picks_the_candidate_with_the_best_auroc_on_the_shuffled_rows() -> None:
    # the shuffled rows differ in energy (higher = OOD) much more than in the gates: a fused candidate wins
    choice = _choose(_cols(2, 300, shift_gates=0.1, shift_energy=3.0))
    table = choice.detectors.selection
    assert len(table) == len(default.ROWS) * len(default.SEARCH)
    main = choice.detectors.main
    assert main is not None and main.name != "mahalanobis"
    assert table[f"{choice.rows}:det_{main.name}_{main.features}"]["patches"] == max(r["patches"] for r in table.values())


def test_a_fused_winner_keeps_its_pure_nrm_detector_fitted_on_the_same_rows() -> None:
    choice = _choose(_cols(2, 300, shift_gates=0.1, shift_energy=3.0))
    main, (pure,) = choice.detectors.main, choice.detectors.candidates
    assert main is not None and (pure.name, pure.features, pure.column) == (
        "mahalanobis", main.features, f"det_mahalanobis_{main.features}")
    expected = D.Mahalanobis(main.features).fit(default.fitting_rows(choice.rows, _cols(0, 400), _cols(1, 900)), 3)
    assert torch.equal(pure.tensors()["means"], expected.tensors()["means"])


def test_without_shuffled_rows_the_fixed_candidate_is_fitted() -> None:
    choice = _choose(None)
    main = choice.detectors.main
    assert main is not None and (choice.rows, main.name, main.features) == default.FIXED
    assert choice.detectors.selection == {}


def test_the_train20k_rows_are_the_first_training_rows() -> None:
    train = {"pred": torch.arange(default.TRAIN_ROWS + 50)}
    rows = default.fitting_rows("train20k", {"pred": torch.arange(10)}, train)
    assert torch.equal(rows["pred"], torch.arange(default.TRAIN_ROWS))


def test_the_half_rows_are_half_a_of_the_held_out_rows() -> None:
    held = _cols(0, 400)
    rows = default.fitting_rows("half", held, _cols(1, 900))
    assert torch.equal(rows["pred"], held["pred"][D.split_halves(400)[0]])


def test_a_winner_fitted_on_training_rows_is_thresholded_on_every_held_out_row() -> None:
    held = _cols(0, 400)
    choice = default.choose_default(held, _cols(1, 900), None, D.Head(3))
    assert choice.rows != "half" and torch.equal(choice.threshold_rows["pred"], held["pred"])


def test_refit_default_sets_the_threshold_of_the_winner_on_its_threshold_rows() -> None:
    torch.manual_seed(0)
    model = nrm.NRM(tiny_config(channels=1, size=8, classes=3)).eval().requires_grad_(False)
    x = lambda seed, n: torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    choice = refit_default(model, [x(1, 160)], [x(2, 300)], [x(3, 100) * 4])
    main, th = choice.detectors.main, model.config.fitted.threshold
    assert main is not None and th is not None and th.score == f"det_{main.name}" == main.column
    assert th.value == float(threshold_at_tpr(main.score(choice.threshold_rows).numpy(), th.tpr))


# --------------------------------------------------------------------------- the robust fusion
def test_mahalanobis_energy_robust_standardises_by_the_median_and_mad_of_the_held_fifth() -> None:
    cols = _cols(0, 500)
    det = D.MahalanobisEnergyRobust("gates_acts").fit(cols, 3)
    held = torch.randperm(500, generator=torch.Generator().manual_seed(0))[400:]
    e = -cols["energy"].double()[held]  # energy does not depend on the Gaussian
    med = e.median()
    torch.testing.assert_close(det.tensors()["centre"][1], med)
    torch.testing.assert_close(det.tensors()["scale"][1], 1.4826 * (e - med).abs().median())
