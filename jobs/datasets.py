"""Labelled image datasets from Parquet (local or S3) into memory, for training and evaluation.

Reads every file named by a URI (file, directory, glob, s3:// prefix) with pyarrow and decodes the
images with the same code as the scoring job, as the given model input asks (its InputSpec: size,
resize and crop; or a bare (C, H, W), to which every image is resized).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.images import Policy, Target, decode_column, detect_columns
from jobs.storage import Store
from nrm.names import DECODES

if TYPE_CHECKING:
    from nrm.config import InputSpec


class DatasetError(ValueError):
    pass


def probe_shape(uri: str, store: Store | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the first image of the first file: what `nrm-ood train` builds its model for."""
    import io

    from PIL import Image

    store = store or Store()
    f = store.list_parquet(uri)[0]
    fs, path = store.filesystem(f.uri)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        cols = detect_columns(pf.schema_arrow)
        if cols.kind == "raw":
            raise DatasetError(f"{f.uri}: raw pixel columns carry no shape; give --arch explicitly")
        cell = pf.read_row_group(0, columns=[cols.image]).column(0)[0].as_py()
    data = cell["bytes"] if isinstance(cell, dict) else cell
    img = Image.open(io.BytesIO(data))
    channels = 1 if img.mode in ("L", "1", "I", "I;16") else 3
    return channels, img.size[1], img.size[0]


def load_labelled(
    uri: str, shape: InputSpec | tuple[int, int, int], limit: int | None = None, store: Store | None = None,
    policy: Policy = Policy.adapt, decode: str = DECODES[0],
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) and int64 labels (N,) of every decodable, labelled row of ``uri``."""
    return _load(uri, Target.of(shape, decode), limit, store, policy, labelled=True)


def load_images(
    uri: str, shape: InputSpec | tuple[int, int, int], limit: int | None = None, store: Store | None = None,
    policy: Policy = Policy.adapt, decode: str = DECODES[0],
) -> np.ndarray:
    """uint8 images (N, H, W, C) of every decodable row of ``uri``; labels are not needed (OOD sets)."""
    return _load(uri, Target.of(shape, decode), limit, store, policy, labelled=False)[0]


def _load(uri: str, target: Target, limit: int | None, store: Store | None, policy: Policy,
          labelled: bool) -> tuple[np.ndarray, np.ndarray]:
    store = store or Store()
    images, labels, bad = [], [], 0
    n = 0
    for f in store.list_parquet(uri):
        fs, path = store.filesystem(f.uri)
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            cols = detect_columns(pf.schema_arrow)
            if labelled and cols.label is None:
                raise DatasetError(f"{f.uri} has no integer 'label' column; training and evaluation need labels")
            table = pf.read(columns=[cols.image] + ([cols.label] if labelled else []))
        if limit is not None:
            table = table.slice(0, max(0, limit - n))
        px, errors = decode_column(table.column(cols.image), cols.kind, target, policy)
        ok = np.array([e is None for e in errors], dtype=bool)
        if labelled:
            ok &= np.array([v is not None for v in table.column(cols.label).to_pylist()], dtype=bool)
            labels.append(np.asarray(table.column(cols.label).fill_null(-1).to_numpy())[ok].astype(np.int64))
        bad += int((~ok).sum())
        images.append(px[ok])
        n += table.num_rows
        if limit is not None and n >= limit:
            break
    what = "labelled images" if labelled else "images"
    if bad:
        import logging

        logging.getLogger("nrm_ood").warning("%s: skipped %d undecodable%s rows", uri, bad,
                                             " or unlabelled" if labelled else "")
    if not images or sum(len(i) for i in images) == 0:
        raise DatasetError(f"no usable {what} in {uri!r}")
    return np.concatenate(images), (np.concatenate(labels) if labelled else np.zeros(0, np.int64))


def png_cells(images: np.ndarray, stem: str) -> list[dict[str, Any]]:
    """uint8 images (N, H, W) or (N, H, W, C) as Hugging Face image cells {bytes: PNG, path}."""
    from PIL import Image

    cells = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img).save(buf, "PNG")
        cells.append({"bytes": buf.getvalue(), "path": f"{stem}-{i}.png"})
    return cells


def write_hf_parquet(path: Path, cells: list[dict[str, Any]], labels: np.ndarray | None = None,
                     row_group_size: int = 1024) -> None:
    """One Parquet file in the Hugging Face image layout: image struct<bytes, path> [, label int64]."""
    cols: dict[str, Any] = {"image": cells}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
