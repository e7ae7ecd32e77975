"""JPEG batches decoded on the GPU with nvJPEG, for a scoring actor that holds a GPU.

``decode_batch`` takes a batch's encoded cells and returns uint8 pixels (N, H, W, C) on the device, as
``jobs.images.decode_column`` returns them on the CPU: the baseline and progressive RGB or grayscale
JPEGs go to ``torchvision.io.decode_jpeg(list, device="cuda")`` in one call; every other row (PNG,
CMYK JPEG, a row nvJPEG refuses, an empty cell) is decoded on the CPU by ``jobs.images``, so a bad row
is an error row, never a failed batch. The model's resize and centre crop then run on the GPU with
torchvision's tensor resize (antialiased), which differs from Pillow's by a few levels at most: use
the CPU decoders where pixels must equal torchvision's PIL pipeline.

A decompression bomb is refused before any decoding: the JPEG header gives the size (Pillow reads
only the header) and jobs.images.MAX_PIXELS applies as on the CPU. Only the adapt policy runs here
(strict rows go to the CPU decoder, which checks them).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from jobs.images import MAX_PIXELS, Policy, RowError, Target, decode_encoded

JpegDecoder = Callable[..., Any]  # torchvision.io.decode_jpeg's signature


def _nvjpeg() -> JpegDecoder:
    from torchvision.io import decode_jpeg

    return decode_jpeg


def gpu_rows(cells: list[bytes | None], policy: Policy) -> list[int]:
    """The rows nvJPEG is given: RGB or grayscale JPEGs within MAX_PIXELS, under the adapt policy."""
    if policy is not Policy.adapt:
        return []
    rows = []
    for i, cell in enumerate(cells):
        if not cell or cell[:2] != b"\xff\xd8":
            continue
        try:
            head = Image.open(io.BytesIO(cell))  # reads the header only
        except Exception:
            continue  # the CPU decoder says what is wrong with it
        if head.format == "JPEG" and head.mode in ("L", "RGB") and head.size[0] * head.size[1] <= MAX_PIXELS:
            rows.append(i)
    return rows


def decode_batch(cells: list[bytes | None], target: Target, policy: Policy = Policy.adapt, device: str = "cuda",
                 decode_jpeg: JpegDecoder | None = None) -> tuple[Tensor, list[str | None]]:
    """Encoded cells -> (uint8 (N, H, W, C) on ``device``, zeros on error rows; per-row error or None).
    ``decode_jpeg`` defaults to torchvision.io.decode_jpeg."""
    c, h, w = target.shape
    out = torch.zeros((len(cells), h, w, c), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(cells)
    on_gpu = gpu_rows(cells, policy)
    jpegs = [cells[i] or b"" for i in on_gpu]
    decoded = dict(zip(on_gpu, _decode_jpegs(jpegs, c, device, decode_jpeg or _nvjpeg()), strict=True))
    for i in range(len(cells)):
        if (img := decoded.get(i)) is not None:
            out[i] = fit_tensor(img, target).permute(1, 2, 0)
            continue
        try:
            out[i] = torch.tensor(decode_encoded(cells[i], target, policy)[0], device=device)
        except RowError as e:
            errors[i] = str(e)
    return out, errors


def _decode_jpegs(data: list[bytes], channels: int, device: str, decode_jpeg: JpegDecoder) -> list[Tensor | None]:
    """(C, h, w) uint8 tensors on ``device``, one per JPEG: all in one call, or, when that call fails,
    one call a row; None for a row nvJPEG refuses."""
    if not data:
        return []
    from torchvision.io import ImageReadMode

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decode_jpeg's deprecation in favour of TorchCodec
        try:
            return list(decode_jpeg(raw, mode=mode, device=device))
        except RuntimeError:
            pass
        got: list[Tensor | None] = []
        for r in raw:
            try:
                got.append(decode_jpeg(r, mode=mode, device=device))
            except RuntimeError:
                got.append(None)
        return got


def fit_tensor(img: Tensor, target: Target) -> Tensor:
    """A decoded (C, h, w) uint8 image brought to ``target`` on its device, as jobs.images._fit does with
    Pillow: the shorter side resized (aspect kept), the centre crop, else a resize to H x W."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    c, h, w = target.shape
    mode = InterpolationMode(target.interpolation)
    if target.resize is not None:
        rw, rh = target.resized((img.shape[2], img.shape[1]))
        if (rh, rw) != tuple(img.shape[1:]):
            img = F.resize(img, [rh, rw], interpolation=mode, antialias=True)
    if target.crop:
        img = F.center_crop(img, [h, w])
    if tuple(img.shape[1:]) != (h, w):
        img = F.resize(img, [h, w], interpolation=mode, antialias=True)
    return img

