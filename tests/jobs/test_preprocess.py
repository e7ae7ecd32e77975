"""The model's own preprocessing (nrm.config.InputSpec: resize, centre crop, interpolation) as the
decoder applies it (jobs.images), against torchvision's PIL transforms on the shared ImageNet photos,
and the fast (DCT-scaled) JPEG decode."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from photos import photo_bytes, photo_rows, torchvision
from PIL import Image
from support import tiny_config

import nrm
from jobs.images import Policy, RowError, Target, _draft, decode_encoded
from nrm.config import InputSpec, ModelConfig, input_preset

pytestmark = pytest.mark.data
IMAGENET = input_preset("imagenet")


def torchvision_pixels(data: bytes, spec: InputSpec) -> np.ndarray:
    """torchvision's Resize(S) + CenterCrop(H, W) on the photo opened as RGB (uint8 H, W, C)."""
    t = torchvision().transforms
    mode = t.InterpolationMode(spec.interpolation)
    pipe = t.Compose([t.Resize(spec.resize, interpolation=mode), t.CenterCrop(spec.crop), t.PILToTensor()])
    return pipe(Image.open(io.BytesIO(data)).convert("RGB")).permute(1, 2, 0).numpy()


def ours(data: bytes, spec: InputSpec, decode: str = "exact") -> np.ndarray:
    return decode_encoded(data, Target.of(spec, decode), Policy.adapt)[0]


# ---------------------------------------------------------------------------- equal to torchvision
@pytest.mark.parametrize("min_side", [0, 700], ids=["any-size", "large"])
def test_rgb_photos_enter_the_network_as_torchvision_resize_and_crop_them(min_side: int) -> None:
    for row in photo_rows("RGB", 4, min_side):
        np.testing.assert_array_equal(ours(photo_bytes(row), IMAGENET), torchvision_pixels(photo_bytes(row), IMAGENET))


def test_a_photo_smaller_than_the_crop_is_resized_up_as_torchvision_does() -> None:
    small = photo_rows("RGB", 1, 0, 200)[0]
    np.testing.assert_array_equal(ours(photo_bytes(small), IMAGENET), torchvision_pixels(photo_bytes(small), IMAGENET))


def test_grayscale_photos_become_rgb_as_torchvision_sees_them() -> None:
    rows = photo_rows("L", 3)
    assert rows, "the shared photos hold grayscale JPEGs"
    for row in rows:
        assert Image.open(io.BytesIO(photo_bytes(row))).mode == "L"
        np.testing.assert_array_equal(ours(photo_bytes(row), IMAGENET), torchvision_pixels(photo_bytes(row), IMAGENET))


@pytest.mark.parametrize("interpolation", ["bicubic", "nearest"])
def test_each_interpolation_matches_torchvision(interpolation: str) -> None:
    spec = replace(IMAGENET, interpolation=interpolation)
    row = photo_rows("RGB", 1, 400)[0]
    np.testing.assert_array_equal(ours(photo_bytes(row), spec), torchvision_pixels(photo_bytes(row), spec))


def test_normalised_input_equals_torchvision_to_tensor_and_normalize() -> None:
    """NRM.preprocess of the decoded pixels = ToTensor + Normalize of torchvision's crop, to float rounding."""
    t = torchvision().transforms
    model = nrm.NRM(ModelConfig(IMAGENET, ["a", "b", "c"], tiny_config(3, 224).nodes))
    rows = photo_rows("RGB", 2) + photo_rows("L", 1)
    pixels = np.stack([ours(photo_bytes(r), IMAGENET) for r in rows])
    pipe = t.Compose([t.Resize(256), t.CenterCrop(224), t.ToTensor(), t.Normalize(IMAGENET.mean, IMAGENET.std)])
    theirs = torch.stack([pipe(Image.open(io.BytesIO(photo_bytes(r))).convert("RGB")) for r in rows])
    torch.testing.assert_close(model.preprocess(torch.from_numpy(pixels)), theirs, rtol=0, atol=2e-6)


def test_a_model_without_resize_or_crop_still_squashes_every_image_to_its_size() -> None:
    row = photo_rows("RGB", 1, 400)[0]
    plain = replace(IMAGENET, resize=None, crop=None)
    img = Image.open(io.BytesIO(photo_bytes(row))).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(ours(photo_bytes(row), plain), np.asarray(img))


def test_strict_policy_accepts_any_photo_size_when_the_model_declares_its_resize() -> None:
    row = photo_rows("RGB", 1, 400)[0]
    assert decode_encoded(photo_bytes(row), Target.of(IMAGENET), Policy.strict)[0].shape == (224, 224, 3)


def test_strict_policy_still_refuses_a_grayscale_photo_for_an_rgb_model() -> None:
    with pytest.raises(RowError, match="1 channel"):
        decode_encoded(photo_bytes(photo_rows("L", 1)[0]), Target.of(IMAGENET), Policy.strict)


# ---------------------------------------------------------------------------- fast decode
def test_fast_decode_scales_a_large_jpeg_no_smaller_than_the_resize_needs() -> None:
    row = photo_rows("RGB", 1, 1600)[0]
    img = Image.open(io.BytesIO(photo_bytes(row)))
    need = Target.of(IMAGENET, "fast").resized(img.size)
    full = img.size
    _draft(img, Target.of(IMAGENET, "fast"))
    assert img.size[0] < full[0] / 2 and img.size[0] >= need[0] and img.size[1] >= need[1]


def test_fast_decode_leaves_a_photo_less_than_twice_the_target_exact() -> None:
    small = photo_rows("RGB", 1, 0, 400)[0]
    np.testing.assert_array_equal(ours(photo_bytes(small), IMAGENET, "fast"), ours(photo_bytes(small), IMAGENET))


def test_fast_decode_gives_the_crop_size() -> None:
    row = photo_rows("RGB", 1, 1000)[0]
    assert ours(photo_bytes(row), IMAGENET, "fast").shape == (224, 224, 3)
