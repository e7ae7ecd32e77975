"""jobs.gpu_decode: JPEG batches through nvJPEG, the rest and the refused rows through the CPU decoder.

The tests marked ``cuda`` skip without a CUDA GPU (scripts/gpu_check.sh runs them on one); the others
check, on the CPU, which rows go to nvJPEG, the per-row fallback (with Pillow standing in for
torchvision.io.decode_jpeg, whose C ops do not load beside a CPU torch here) and the tensor resize and crop."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from photos import torchvision
from PIL import Image

from jobs.images import Policy, Target, decode_encoded
from nrm.config import input_preset

torchvision()  # torchvision.io and transforms.v2 import beside a CPU torch
from jobs.gpu_decode import decode_batch, fit_tensor, gpu_rows  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
IMAGENET = Target.of(input_preset("imagenet"))


def photo(mode: str, size: tuple[int, int] = (1024, 768), fmt: str = "JPEG") -> bytes:
    """A smooth synthetic photo (gradients and a disc) encoded as ``fmt``."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / 3) ** 2) * 200], -1)
    img = Image.fromarray(rgb.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def cpu(cell: bytes) -> np.ndarray:
    return decode_encoded(cell, IMAGENET, Policy.adapt)[0]


def test_only_rgb_and_grayscale_jpegs_go_to_nvjpeg() -> None:
    cells = [photo("RGB"), photo("L"), photo("RGB", fmt="PNG"), photo("CMYK"), None, b"\xff\xd8 not a jpeg"]
    assert gpu_rows(cells, Policy.adapt) == [0, 1]


def test_the_strict_policy_decodes_every_row_on_the_cpu() -> None:
    assert gpu_rows([photo("RGB")], Policy.strict) == []


def pillow_standin(refuse: bytes) -> Any:
    """torchvision.io.decode_jpeg's contract, by Pillow: fails any list call (as nvJPEG fails a whole
    batch for one bad row) and the row ``refuse``."""

    def decode(data: Any, mode: Any, device: str) -> torch.Tensor:
        if isinstance(data, list) or bytes(data.numpy()) == refuse:
            raise RuntimeError("nvjpeg: unsupported")
        img = Image.open(io.BytesIO(bytes(data.numpy()))).convert("L" if mode.name == "GRAY" else "RGB")
        return torch.from_numpy(np.asarray(img).copy()).reshape(img.size[1], img.size[0], -1).permute(2, 0, 1)

    return decode


def test_a_row_the_jpeg_decoder_refuses_is_decoded_on_the_cpu() -> None:
    cells = [photo("RGB"), photo("RGB", (900, 700))]
    pixels, errors = decode_batch(cells, IMAGENET, device="cpu", decode_jpeg=pillow_standin(refuse=cells[1]))
    assert errors == [None, None]
    np.testing.assert_array_equal(pixels[1].numpy(), cpu(cells[1]))


def test_an_undecodable_row_is_an_error_row_beside_decoded_ones() -> None:
    cells = [photo("RGB"), b"\xff\xd8\xff\xe0 truncated"]
    pixels, errors = decode_batch(cells, IMAGENET, device="cpu", decode_jpeg=pillow_standin(refuse=b""))
    assert errors[0] is None and errors[1] is not None and "cannot decode image" in errors[1]


def test_tensor_resize_and_crop_stay_within_a_few_levels_of_pillows() -> None:
    cell = photo("RGB")
    img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(cell))).copy()).permute(2, 0, 1)
    diff = np.abs(fit_tensor(img, IMAGENET).permute(1, 2, 0).numpy().astype(int) - cpu(cell).astype(int))
    assert fit_tensor(img, IMAGENET).shape == (3, 224, 224) and diff.mean() < 1.0


@cuda
def test_nvjpeg_decodes_a_batch_within_a_few_levels_of_the_cpu_decoder() -> None:
    cells = [photo("RGB"), photo("L"), photo("RGB", (640, 480))]
    pixels, errors = decode_batch(cells, IMAGENET, device="cuda")
    assert errors == [None] * 3 and pixels.device.type == "cuda"
    for i, cell in enumerate(cells):
        assert np.abs(pixels[i].cpu().numpy().astype(int) - cpu(cell).astype(int)).mean() < 1.5


@cuda
def test_nvjpeg_batch_keeps_png_and_bad_rows_on_the_cpu() -> None:
    cells = [photo("RGB"), photo("RGB", fmt="PNG"), b"\xff\xd8\xff\xe0 truncated", photo("CMYK")]
    pixels, errors = decode_batch(cells, IMAGENET, device="cuda")
    assert [e is None for e in errors] == [True, True, False, True]
    np.testing.assert_array_equal(pixels[1].cpu().numpy(), cpu(cells[1]))
    np.testing.assert_array_equal(pixels[3].cpu().numpy(), cpu(cells[3]))
