"""jobs.images: column detection and per-row decoding (no Ray)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from support import png_bytes

from jobs.images import (
    MAX_PIXELS,
    Columns,
    Policy,
    RowError,
    decode_column,
    decode_encoded,
    decode_raw,
    detect_columns,
)

HF = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
GRAY8 = (1, 8, 8)
RGB8 = (3, 8, 8)


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR announces width x height (a decompression bomb's header, cheaply)."""
    data = bytearray(encode(Image.new("1", (8, 8))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# ---------------------------------------------------------------------------- detect_columns
def test_detect_hf_struct_layout() -> None:
    schema = pa.schema([("image", HF), ("label", pa.int64())])
    assert detect_columns(schema) == Columns("image", "hf", None, "label")


def test_detect_plain_binary_column_with_any_name() -> None:
    schema = pa.schema([("id", pa.string()), ("jpeg_data", pa.binary()), ("label", pa.int32())])
    assert detect_columns(schema) == Columns("jpeg_data", "binary", "id", "label")


@pytest.mark.parametrize("typ", [pa.list_(pa.uint8()), pa.list_(pa.float32(), 64), pa.large_list(pa.int64())])
def test_detect_raw_pixel_list_column(typ: pa.DataType) -> None:
    schema = pa.schema([("pixels", typ), ("label", pa.int64())])
    assert detect_columns(schema) == Columns("pixels", "raw", None, "label")


def test_detect_prefers_conventional_name_over_other_binary() -> None:
    schema = pa.schema([("thumbnail", pa.binary()), ("image", HF)])
    assert detect_columns(schema).image == "image"


def test_detect_string_label_is_not_taken_as_label() -> None:
    schema = pa.schema([("image", HF), ("label", pa.string())])
    assert detect_columns(schema).label is None


def test_detect_overrides() -> None:
    schema = pa.schema([("image", HF), ("thumb", pa.binary()), ("key", pa.string()), ("target", pa.int64()),
                        ("id", pa.string()), ("label", pa.int64())])
    assert detect_columns(schema, image="thumb", id="key", label="target") == Columns("thumb", "binary", "key",
                                                                                       "target")


def test_missing_image_column_error_names_the_columns() -> None:
    schema = pa.schema([("caption", pa.string()), ("width", pa.int64())])
    with pytest.raises(ValueError, match="no image column") as e:
        detect_columns(schema)
    assert "'caption'" in str(e.value) and "'width'" in str(e.value)
    assert "--image-column" in str(e.value)


def test_override_image_column_not_found_names_the_columns() -> None:
    schema = pa.schema([("image", HF), ("label", pa.int64())])
    with pytest.raises(ValueError, match="image column 'img' not found") as e:
        detect_columns(schema, image="img")
    assert "'image'" in str(e.value) and "'label'" in str(e.value)


def test_override_image_column_of_wrong_type() -> None:
    schema = pa.schema([("image", HF), ("caption", pa.string())])
    with pytest.raises(ValueError, match="image column 'caption' has type string"):
        detect_columns(schema, image="caption")


@pytest.mark.parametrize("kw", [{"id": "uid"}, {"label": "y"}])
def test_override_id_or_label_not_found(kw: dict[str, str]) -> None:
    schema = pa.schema([("image", HF), ("label", pa.int64())])
    with pytest.raises(ValueError, match="not found; the file has columns"):
        detect_columns(schema, **kw)


# ---------------------------------------------------------------------------- encoded images
def test_png_gray_roundtrip_is_exact() -> None:
    px = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    out = decode_encoded(png_bytes(px), GRAY8, Policy.adapt)[0]
    assert out.dtype == np.uint8 and out.shape == (8, 8, 1)
    np.testing.assert_array_equal(out, px)


def test_png_rgb_roundtrip_is_exact() -> None:
    px = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_encoded(png_bytes(px), RGB8, Policy.strict)[0], px)


def test_jpeg_decodes_close_to_source() -> None:
    px = np.full((8, 8, 3), (200, 100, 50), dtype=np.uint8)
    out = decode_encoded(encode(Image.fromarray(px), "JPEG", quality=95), RGB8, Policy.adapt)[0]
    assert out.shape == (8, 8, 3)
    assert np.abs(out.astype(int) - px).max() <= 4


def test_adapt_gray_to_rgb_replicates() -> None:
    px = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3
    out = decode_encoded(png_bytes(px), RGB8, Policy.adapt)[0]
    assert out.shape == (8, 8, 3)
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], px[..., 0])


def test_adapt_rgb_to_gray_by_luminance() -> None:
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = decode_encoded(png_bytes(red), GRAY8, Policy.adapt)[0]
    assert out.shape == (8, 8, 1)
    assert np.all(out == 76)  # ITU-R 601: 255 * 299/1000


def test_adapt_drops_alpha() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    np.testing.assert_array_equal(decode_encoded(encode(rgba), RGB8, Policy.adapt)[0],
                                  np.broadcast_to(np.array([10, 20, 30], np.uint8), (8, 8, 3)))


def test_adapt_resizes_to_model_size() -> None:
    big = Image.new("L", (16, 24), 77)
    out = decode_encoded(encode(big), GRAY8, Policy.adapt)[0]
    assert out.shape == (8, 8, 1) and np.all(out == 77)


@pytest.mark.parametrize(("img", "shape", "text"), [
    (Image.new("L", (16, 16)), GRAY8, "16x16 with 1 channel(s)"),
    (Image.new("RGB", (8, 8)), GRAY8, "8x8 with 3 channel(s)"),
    (Image.new("L", (8, 8)), RGB8, "8x8 with 1 channel(s)"),
])
def test_strict_policy_refuses_mismatch(img: Image.Image, shape: tuple[int, int, int], text: str) -> None:
    with pytest.raises(RowError, match="policy strict") as e:
        decode_encoded(encode(img), shape, Policy.strict)[0]
    assert text in str(e.value)


def test_strict_policy_accepts_alpha_as_same_channels() -> None:
    assert decode_encoded(encode(Image.new("LA", (8, 8))), GRAY8, Policy.strict)[0].shape == (8, 8, 1)


def test_strict_error_rows_in_a_column_do_not_stop_the_others() -> None:
    good = png_bytes(np.full((8, 8, 1), 9, np.uint8))
    col = pa.array([{"bytes": good, "path": "a"}, {"bytes": encode(Image.new("L", (9, 8))), "path": "b"},
                    {"bytes": good, "path": "c"}], HF)
    pixels, errors = decode_column(col, "hf", GRAY8, Policy.strict)
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None and "9x8" in errors[1] and "policy strict" in errors[1]
    assert np.all(pixels[[0, 2]] == 9) and np.all(pixels[1] == 0)


def test_corrupt_bytes() -> None:
    with pytest.raises(RowError, match=r"cannot decode image \(12 bytes\)"):
        decode_encoded(b"not an image", GRAY8, Policy.adapt)[0]


def test_truncated_png() -> None:
    data = png_bytes(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(RowError, match="cannot decode image"):
        decode_encoded(data[: len(data) // 2], RGB8, Policy.adapt)[0]


@pytest.mark.parametrize("data", [b"", None])
def test_empty_or_null_bytes(data: bytes | None) -> None:
    with pytest.raises(RowError, match="empty image"):
        decode_encoded(data, GRAY8, Policy.adapt)[0]


def test_decompression_bomb_refused_by_pixel_count() -> None:
    bomb = png_with_size(20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(RowError, match="decompression bomb refused") as e:
        decode_encoded(bomb, GRAY8, Policy.adapt)[0]
    assert "400000000 pixels" in str(e.value)


def test_bomb_between_one_and_two_limits_is_refused_too() -> None:
    side = int((MAX_PIXELS * 1.3) ** 0.5)  # Pillow only warns below 2x its limit: the warning must count
    with pytest.raises(RowError, match="refused|exceeds"):
        decode_encoded(png_with_size(side, side), GRAY8, Policy.adapt)[0]


def test_hf_column_with_null_struct_and_null_bytes() -> None:
    good = png_bytes(np.full((8, 8, 1), 5, np.uint8))
    col = pa.array([{"bytes": good, "path": "a"}, None, {"bytes": None, "path": "c"}], HF)
    pixels, errors = decode_column(col, "hf", GRAY8, Policy.adapt)
    assert errors[0] is None and np.all(pixels[0] == 5)
    assert errors[1] == errors[2] == "empty image (no bytes)"


def test_hf_column_sliced_chunks_keep_row_alignment() -> None:
    imgs = [png_bytes(np.full((8, 8, 1), v, np.uint8)) for v in (1, 2, 3, 4)]
    col = pa.array([{"bytes": b, "path": str(i)} for i, b in enumerate(imgs)], HF)
    chunked = pa.chunked_array([col.slice(1, 2), col.slice(3, 1)])
    pixels, errors = decode_column(chunked, "hf", GRAY8, Policy.adapt)
    assert errors == [None, None, None]
    assert [int(p[0, 0, 0]) for p in pixels] == [2, 3, 4]


def test_binary_column() -> None:
    col = pa.array([png_bytes(np.full((8, 8, 1), 200, np.uint8)), b"\x89PNG junk", None], pa.binary())
    pixels, errors = decode_column(col, "binary", GRAY8, Policy.adapt)
    assert errors[0] is None and np.all(pixels[0] == 200)
    assert errors[1] is not None and errors[1].startswith("cannot decode image (9 bytes)")
    assert errors[2] == "empty image (no bytes)"


# ---------------------------------------------------------------------------- raw pixels
def test_raw_uint8_list() -> None:
    vals = list(range(64))
    np.testing.assert_array_equal(decode_raw(vals, GRAY8, Policy.strict)[0],
                                  np.arange(64, dtype=np.uint8).reshape(8, 8, 1))


def test_raw_hwc_order_for_rgb() -> None:
    px = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_raw(px.ravel().tolist(), RGB8, Policy.strict)[0], px)


def test_raw_float_unit_range_is_scaled() -> None:
    vals = [0.0, 1.0, 0.5, 0.25] * 16
    out = decode_raw(vals, GRAY8, Policy.adapt)[0]
    assert out.dtype == np.uint8
    assert out.ravel()[:4].tolist() == [0, 255, 128, 64]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_raw_float_nan_or_inf_is_row_error(bad: float) -> None:
    vals = [0.5] * 64
    vals[10] = bad
    with pytest.raises(RowError, match="1 NaN/inf value"):
        decode_raw(vals, GRAY8, Policy.adapt)[0]


def test_raw_nan_in_column_names_nan() -> None:
    col = pa.array([[0.5] * 64, [float("nan")] + [0.5] * 63], pa.list_(pa.float32()))
    pixels, errors = decode_column(col, "raw", GRAY8, Policy.adapt)
    assert errors[0] is None and np.all(pixels[0] == 128)
    assert errors[1] is not None and "NaN" in errors[1]


def test_raw_fixed_size_list_and_tensor_columns() -> None:
    flat = np.arange(128, dtype=np.uint8)
    fsl = pa.FixedSizeListArray.from_arrays(pa.array(flat), 64)
    pixels, errors = decode_column(fsl, "raw", GRAY8, Policy.adapt)
    assert errors == [None, None] and pixels[1].ravel()[0] == 64
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(flat.reshape(2, 8, 8, 1))
    pixels, errors = decode_column(tensor, "raw", GRAY8, Policy.adapt)
    assert errors == [None, None]
    np.testing.assert_array_equal(pixels, flat.reshape(2, 8, 8, 1))


def test_raw_rgb_values_for_gray_model_adapt_vs_strict() -> None:
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert np.all(decode_raw(red.ravel(), GRAY8, Policy.adapt)[0] == 76)
    with pytest.raises(RowError, match="expected 64"):
        decode_raw(red.ravel(), GRAY8, Policy.strict)[0]


@pytest.mark.parametrize(("cell", "text"), [
    (None, "null pixel array"),
    ([], "zero pixels"),
    ([1, 2, 3], "has 3 values; expected 64"),
    ([1, None, 3], "ragged or non-numeric"),
])
def test_raw_bad_cells(cell: object, text: str) -> None:
    with pytest.raises(RowError, match=text):
        decode_raw(cell, GRAY8, Policy.adapt)[0]


def test_raw_list_with_null_element_is_row_error() -> None:
    col = pa.array([[1] * 63 + [None]], pa.list_(pa.uint8()))
    _, errors = decode_column(col, "raw", GRAY8, Policy.adapt)
    assert errors[0] is not None and "non-numeric" in errors[0]


# ---------------------------------------------------------------------------- bugs
def test_raw_int_out_of_range_is_a_row_error_not_wrapped() -> None:
    with pytest.raises(RowError, match=r"integer pixel values span \[0, 300\]; expected 0\.\.255"):
        decode_raw([300] + [0] * 63, GRAY8, Policy.adapt)[0]


def test_raw_float_outside_unit_range_is_row_error() -> None:
    with pytest.raises(RowError):
        decode_raw([128.0] * 64, GRAY8, Policy.adapt)[0]


def test_16bit_png_is_scaled_to_8bit() -> None:
    data = encode(Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_encoded(data, GRAY8, Policy.adapt)[0]
    assert np.all(np.abs(out.astype(int) - 128) <= 1), f"got {out[0, 0, 0]}"


def test_strict_counts_palette_channels_by_palette() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0)).convert("P")
    assert decode_encoded(encode(red), RGB8, Policy.strict)[0].shape == (8, 8, 3)


def test_ragged_nested_raw_cell_is_a_row_error_not_a_column_error() -> None:
    rows = [[[7] * 8] * 8, [[7] * 8] * 7 + [[7] * 3]]  # row 1: last image row has 3 values, not 8
    col = pa.array(rows, pa.list_(pa.list_(pa.uint8())))
    pixels, errors = decode_column(col, "raw", GRAY8, Policy.adapt)
    assert errors[0] is None and np.all(pixels[0] == 7)
    assert errors[1] is not None


def test_non_numeric_raw_cell_is_a_row_error() -> None:
    col = pa.array([["x"] * 64], pa.list_(pa.string()))
    _, errors = decode_column(col, "raw", GRAY8, Policy.adapt)
    assert errors[0] is not None
