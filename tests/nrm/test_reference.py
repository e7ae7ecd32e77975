"""The threshold's in-distribution reference: recorded at fit time, saved and loaded with the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import make_checkpoint, tiny_config

import nrm
from nrm.config import ConfigError, Threshold
from nrm.fit import fit
from nrm.reference import QUANTILES, Reference, describe


def test_describe_records_rows_flagged_rate_and_quantiles_of_1_to_100() -> None:
    ref = describe(np.arange(1.0, 101.0), value=6.0)  # 1..5 are below the threshold: flagged
    assert ref.rows == 100 and ref.expected_rate == 0.05
    assert len(ref.quantiles) == QUANTILES
    assert ref.quantiles[0] == 1.0 and ref.quantiles[-1] == 100.0 and ref.quantiles[100] == 50.5  # the median


def test_reference_cdf_interpolates_its_quantiles() -> None:
    ref = Reference(10, 0.1, (0.0, 10.0, 20.0))  # probabilities 0, 0.5, 1
    assert ref.cdf([-1.0, 0.0, 5.0, 10.0, 15.0, 25.0]).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]


def test_reference_refuses_decreasing_quantiles() -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        Reference(10, 0.05, (1.0, 0.0))


def test_fit_records_the_reference_of_the_rows_that_set_the_threshold() -> None:
    torch.manual_seed(0)
    model = nrm.NRM(tiny_config()).eval().requires_grad_(False)
    train, val = torch.randn(64, 1, 8, 8), torch.randn(200, 1, 8, 8)
    th = fit(model, [train], [val]).threshold
    assert th is not None and th.reference is not None
    held = model.score(val)[th.score].double().numpy()
    assert th.reference.rows == 200
    assert th.reference.expected_rate == float(np.mean(held < th.value)) == pytest.approx(0.05, abs=0.005)
    assert th.reference.quantiles[0] == pytest.approx(held.min()) and th.reference.quantiles[-1] == pytest.approx(held.max())


def test_the_reference_survives_save_and_load(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ck")
    saved = json.loads((path / "config.json").read_text())["threshold"]
    assert set(saved) == {"score", "value", "tpr", "reference"} and len(saved["reference"]["quantiles"]) == QUANTILES
    th = nrm.load(path).config.fitted.threshold
    assert th is not None and th.reference == Reference.from_json(saved["reference"])


def test_a_checkpoint_without_a_reference_loads_with_none() -> None:
    assert Threshold.from_json({"score": "latent_loglik", "value": -1.0, "tpr": 0.95}).reference is None


def test_a_bad_reference_is_a_config_error_that_names_it() -> None:
    with pytest.raises(ConfigError, match="threshold.reference"):
        Threshold.from_json({"score": "s", "value": 0.0, "reference": {"rows": 3, "expected_rate": 0.1,
                                                                       "quantiles": [2.0, 1.0]}})
