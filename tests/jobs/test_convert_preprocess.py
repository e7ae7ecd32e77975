"""`nrm-ood convert`'s preprocessing options: --preset, --resize, --crop, --interpolation, into config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from nrm.names import INPUT_PRESETS

runner = CliRunner(env={"COLUMNS": "200"})

MODEL_FILE = '''
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))
'''


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "model.py"
    path.write_text(MODEL_FILE)
    return path


def convert(model_file: Path, out: Path, *options: str) -> object:
    return runner.invoke(app, ["convert", "--module", f"{model_file}:make", "--out", str(out), *options])


def input_section(out: Path) -> dict[str, object]:
    return json.loads((out / "config.json").read_text())["input"]


def test_preset_imagenet_stores_torchvisions_eval_preprocessing(model_file: Path, tmp_path: Path) -> None:
    r = convert(model_file, tmp_path / "c", "--preset", "imagenet")
    assert r.exit_code == 0, r.output
    p = INPUT_PRESETS["imagenet"]
    assert input_section(tmp_path / "c") == {
        "channels": 3, "height": 224, "width": 224, "mean": list(p["mean"]), "std": list(p["std"]),  # type: ignore[call-overload]
        "resize": 256, "crop": [224, 224], "interpolation": "bilinear"}


def test_explicit_options_replace_the_presets_values(model_file: Path, tmp_path: Path) -> None:
    r = convert(model_file, tmp_path / "c", "--preset", "imagenet", "--resize", "232", "--interpolation", "bicubic",
                "--crop", "192,160", "--mean", "0.5,0.5,0.5")
    assert r.exit_code == 0, r.output
    got = input_section(tmp_path / "c")
    assert (got["resize"], got["crop"], got["interpolation"], got["mean"], got["height"], got["width"]) == \
        (232, [192, 160], "bicubic", [0.5, 0.5, 0.5], 192, 160)


def test_crop_alone_sets_the_input_size(model_file: Path, tmp_path: Path) -> None:
    r = convert(model_file, tmp_path / "c", "--resize", "72", "--crop", "64")
    assert r.exit_code == 0, r.output
    got = input_section(tmp_path / "c")
    assert (got["channels"], got["height"], got["width"], got["resize"], got["crop"]) == (3, 64, 64, 72, [64, 64])


def test_a_crop_other_than_the_input_shape_exits_1_naming_both(model_file: Path, tmp_path: Path) -> None:
    r = convert(model_file, tmp_path / "c", "--input-shape", "3,224,224", "--crop", "200")
    assert r.exit_code == 1
    assert "--crop 200,200 differs from --input-shape 3,224,224" in r.output


def test_no_input_size_at_all_exits_1_saying_what_to_give(model_file: Path, tmp_path: Path) -> None:
    r = convert(model_file, tmp_path / "c", "--resize", "256")
    assert r.exit_code == 1
    assert "give --input-shape C,H,W, or --crop H[,W], or --preset" in r.output


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--crop", "0", "expected H or H,W (positive integers), got '0'"),
    ("--crop", "224,224,3", "expected H or H,W (positive integers), got '224,224,3'"),
    ("--resize", "0", "must be >= 1, got 0"),
    ("--interpolation", "lanczos", "'lanczos' is not one of 'bilinear', 'bicubic', 'nearest'"),
    ("--preset", "coco", "'coco' is not one of 'imagenet'"),
])
def test_a_bad_preprocessing_option_is_refused_at_parse_time(model_file: Path, tmp_path: Path, option: str,
                                                             value: str, message: str) -> None:
    r = convert(model_file, tmp_path / "c", "--input-shape", "3,64,64", option, value)
    assert r.exit_code == 2
    assert message in " ".join(r.output.split())
    assert not (tmp_path / "c").exists()
