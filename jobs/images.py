"""Image cells -> uint8 pixels at the model's size, one row at a time, errors per row.

Three input layouts are understood (``detect_columns`` guesses, ``--image-column`` overrides):
- the Hugging Face layout ``image: struct<bytes: binary, path: string>`` of encoded files;
- a plain binary column of encoded images (PNG, JPEG, anything Pillow reads);
- raw pixels: a list/fixed-size-list/tensor column of numbers whose size is H*W*C of the model
  (uint8 as is; floats in [0, 1] are scaled by 255, NaN/inf is a row error).

Mismatch policy (``Policy``), one for all layouts:
- ``adapt`` (default): convert the colour mode to the model's (RGB -> L by luminance, L -> RGB by
  replication, alpha dropped) and resize to the model's H x W with bilinear filtering;
- ``strict``: a row whose channels or size differ from the model's is an error row.
A row that cannot be used either way becomes ``status="error"`` with the reason; it is never dropped.
"""

from __future__ import annotations

import enum
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

# Decompression bombs: refuse any image whose header announces more pixels than this.
MAX_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class Policy(str, enum.Enum):
    adapt = "adapt"
    strict = "strict"


class RowError(ValueError):
    """One row cannot be turned into pixels; the message becomes that row's ``error``."""


@dataclass(frozen=True)
class Columns:
    image: str
    kind: str  # "hf" | "binary" | "raw"
    id: str | None
    label: str | None


def _kind(t: pa.DataType) -> str | None:
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "hf"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        return "raw"
    if isinstance(t, pa.ExtensionType) and "tensor" in str(t).lower():
        return "raw"
    return None


def detect_columns(
    schema: pa.Schema, image: str | None = None, id: str | None = None, label: str | None = None
) -> Columns:
    """Pick the image, id and label columns of ``schema``; raise ValueError naming what is missing."""
    names = schema.names
    if image is not None:
        if image not in names:
            raise ValueError(f"image column {image!r} not found; the file has columns {names}")
        kind = _kind(schema.field(image).type)
        if kind is None:
            raise ValueError(
                f"image column {image!r} has type {schema.field(image).type}; expected struct<bytes, path>, "
                "binary, or a list of pixel values"
            )
    else:
        candidates = [n for n in ("image", "img", "pixels", "image_bytes") if n in names and _kind(schema.field(n).type)]
        candidates += [n for n in names if n not in candidates and _kind(schema.field(n).type) in ("hf", "binary")]
        if not candidates:
            raise ValueError(
                f"no image column found among {names}; expected struct<bytes, path>, binary or pixel-list "
                "column (name one with --image-column)"
            )
        image = candidates[0]
        kind = _kind(schema.field(image).type)
    if id is not None and id not in names:
        raise ValueError(f"id column {id!r} not found; the file has columns {names}")
    if label is not None and label not in names:
        raise ValueError(f"label column {label!r} not found; the file has columns {names}")
    if label is not None and not pa.types.is_integer(schema.field(label).type):
        raise ValueError(f"label column {label!r} has type {schema.field(label).type}; expected integer class ids")
    id = id if id is not None else ("id" if "id" in names else None)
    label = label if label is not None else ("label" if "label" in names and pa.types.is_integer(schema.field("label").type) else None)
    return Columns(image, kind, id, label)  # type: ignore[arg-type]


# Bits of what the adapt policy did to a row (counted per run: the summary and manifest say how many).
CONVERTED, RESIZED = 1, 2


def _fit(img: Image.Image, shape: tuple[int, int, int], policy: Policy) -> tuple[np.ndarray, int]:
    """The image at ``shape`` and what was done to it (CONVERTED | RESIZED bits; 0 when nothing)."""
    c, h, w = shape
    done = 0
    mode = "L" if c == 1 else "RGB"
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits, do not clip
        arr16 = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr16 >> (8 if img.mode.startswith("I;16") else 24)).astype(np.uint8))
    if policy is Policy.strict:
        bands = img.palette.mode if img.mode in ("P", "PA") and img.palette is not None else img.mode
        have = len(bands) - (1 if bands.endswith("A") and bands != "A" else 0)
        if have != c or img.size != (w, h):
            raise RowError(f"image is {img.size[0]}x{img.size[1]} with {have} channel(s) ({img.mode}); "
                           f"the model expects {w}x{h} with {c} (policy strict)")
    if img.mode != mode:
        img = img.convert(mode)
        done |= CONVERTED
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        done |= RESIZED
    arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(h, w, c), done


def decode_encoded(data: bytes | None, shape: tuple[int, int, int], policy: Policy) -> tuple[np.ndarray, int]:
    """Encoded image bytes -> (uint8 (H, W, C) at ``shape`` = (C, H, W), what the adapt policy did)."""
    if data is None or len(data) == 0:
        raise RowError("empty image (no bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise RowError(f"image of {img.size[0]}x{img.size[1]} pixels exceeds the limit of {MAX_PIXELS} pixels")
            img.load()
    except RowError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RowError(f"decompression bomb refused: {e}") from None
    except Exception as e:  # Pillow raises many types for corrupt data
        raise RowError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from None
    return _fit(img, shape, policy)


def decode_raw(values: Any, shape: tuple[int, int, int], policy: Policy) -> tuple[np.ndarray, int]:
    """A raw pixel cell (list or array of H*W*C numbers, HWC order) -> (uint8 (H, W, C), what the adapt
    policy did)."""
    c, h, w = shape
    if values is None:
        raise RowError("empty image (null pixel array)")
    try:
        arr = np.asarray(values)
    except ValueError:
        raise RowError("pixel array has ragged or non-numeric values; expected H*W*C numbers") from None
    if arr.dtype.kind not in "biuf":
        raise RowError(f"pixel array has ragged or non-numeric values ({arr.dtype}); expected numbers "
                       "(uint8 0..255 or floats in [0, 1])")
    if arr.size == 0:
        raise RowError("empty image (zero pixels)")
    if arr.dtype.kind == "f":
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise RowError(f"pixel array has {bad} NaN/inf value(s); expected finite values in [0, 1]")
        if arr.min() < 0 or arr.max() > 1:
            raise RowError(f"float pixel values span [{arr.min():g}, {arr.max():g}]; expected [0, 1]")
        arr = np.rint(arr * 255.0)
    elif arr.min() < 0 or arr.max() > 255:
        raise RowError(f"integer pixel values span [{arr.min()}, {arr.max()}]; expected 0..255")
    if arr.size == c * h * w:
        return arr.astype(np.uint8).reshape(h, w, c), 0
    for cc in (1, 3):  # another colour mode of the same size
        if arr.size == cc * h * w and policy is Policy.adapt:
            img = Image.fromarray(arr.astype(np.uint8).reshape(h, w, cc).squeeze(-1) if cc == 1 else arr.astype(np.uint8).reshape(h, w, cc))
            return _fit(img, shape, policy)
    raise RowError(f"pixel array has {arr.size} values; expected {c * h * w} (= {h}x{w}x{c}, HWC order)")


def decode_column(column: pa.Array | pa.ChunkedArray, kind: str, shape: tuple[int, int, int], policy: Policy,
                  adapted: np.ndarray | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Decode a whole column: pixels (N, H, W, C) uint8 (zeros on error rows) and per-row error or None.
    ``adapted``, if given (N uint8), receives what the adapt policy did to each row (CONVERTED | RESIZED)."""
    c, h, w = shape
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    out = np.zeros((n, h, w, c), dtype=np.uint8)
    errors: list[str | None] = [None] * n
    if kind == "hf":
        cells = column.field("bytes").to_pylist() if column.null_count == 0 else [
            None if v is None else v.get("bytes") for v in column.to_pylist()]
    elif kind == "binary":
        cells = column.to_pylist()
    elif isinstance(column.type, pa.ExtensionType):
        cells = list(column.to_numpy_ndarray()) if hasattr(column, "to_numpy_ndarray") else column.to_pylist()
    else:
        cells = column.to_pylist()
    for i, cell in enumerate(cells):
        try:
            out[i], done = decode_raw(cell, shape, policy) if kind == "raw" else decode_encoded(cell, shape, policy)
            if adapted is not None:
                adapted[i] = done
        except RowError as e:
            errors[i] = str(e)
    return out, errors
