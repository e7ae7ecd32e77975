"""nrm.config.InputSpec: the model's preprocessing (resize, centre crop, interpolation) in config.json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from support import tiny_config

import nrm
from nrm.config import ConfigError, InputSpec, ModelConfig, input_preset

IMAGENET = input_preset("imagenet")


def test_the_imagenet_preset_is_torchvisions_eval_transform() -> None:
    assert (IMAGENET.shape, IMAGENET.resize, IMAGENET.crop, IMAGENET.interpolation) == \
        ((3, 224, 224), 256, (224, 224), "bilinear")


def test_preprocessing_survives_save_and_load(tmp_path: Path) -> None:
    model = nrm.NRM(ModelConfig(IMAGENET, ["a", "b", "c"], tiny_config(3, 224).nodes))
    nrm.save(model, tmp_path / "m")
    assert nrm.load(tmp_path / "m").config.input == IMAGENET


def test_a_config_without_preprocessing_writes_the_input_section_it_always_had() -> None:
    spec = InputSpec(1, 8, 8, (0.5,), (0.25,))
    assert spec.to_json() == {"channels": 1, "height": 8, "width": 8, "mean": [0.5], "std": [0.25]}


def test_a_checkpoint_from_before_loads_without_resize_or_crop() -> None:
    raw = json.loads((Path(__file__).parents[1] / "nrm" / "data" / "v2" / "checkpoint" / "config.json").read_text())
    spec = InputSpec.from_json(raw["input"])
    assert (spec.resize, spec.crop, spec.interpolation) == (None, None, "bilinear")


def test_a_crop_other_than_the_input_size_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"crop \[200, 200\] must equal the input's height and width \[224, 224\]"):
        replace(IMAGENET, crop=(200, 200))


def test_an_unknown_interpolation_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="'lanczos' is not one of"):
        replace(IMAGENET, interpolation="lanczos")


def test_an_unknown_key_in_the_input_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['resize_to'\] in 'input'"):
        InputSpec.from_json({**IMAGENET.to_json(), "resize_to": 256})
