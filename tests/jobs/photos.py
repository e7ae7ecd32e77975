"""The shared full-size ImageNet photos in tests: which rows to use, a small Parquet of them, and
torchvision (imported the way the project does on a machine whose torchvision wheel does not match torch)."""

from __future__ import annotations

import functools
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import dataset_dir

from jobs.datasets import write_hf_parquet


def photo_table() -> dict[str, list]:
    """Every photo's image cell, label, mode and size, as lists; skips the test when the photos are absent."""
    return _table(dataset_dir("imagenet-samples") / "photos" / "part-00000.parquet")


@functools.cache
def _table(path: Path) -> dict[str, list]:
    return pq.read_table(path, columns=["image", "label", "mode", "width", "height"]).to_pydict()


def photo_rows(mode: str, n: int, min_side: int = 0, max_side: int | None = None) -> list[int]:
    """The first ``n`` rows of colour mode ``mode`` ("RGB" or "L") whose shorter side is at least
    ``min_side`` and whose longer side is at most ``max_side``."""
    t = photo_table()
    sides = [(min(w, h), max(w, h)) for w, h in zip(t["width"], t["height"], strict=True)]
    rows = [i for i, m in enumerate(t["mode"])
            if m == mode and sides[i][0] >= min_side and (max_side is None or sides[i][1] <= max_side)]
    return rows[:n]


def photo_bytes(row: int) -> bytes:
    return photo_table()["image"][row]["bytes"]


def write_photos(path: Path, rows: list[int]) -> Path:
    """The photos ``rows`` as one Hugging Face image Parquet (image, label) at ``path``."""
    t = photo_table()
    write_hf_parquet(path, [t["image"][i] for i in rows], np.array([t["label"][i] for i in rows]))
    return path


def torchvision() -> types.ModuleType:
    """torchvision through jobs.torchvision_compat when the project has it, else with its fake-op
    registrations stubbed (its C ops cannot load beside a CPU torch here; models and PIL transforms are
    pure Python)."""
    try:
        from jobs.torchvision_compat import import_torchvision
    except ImportError:
        import sys

        try:
            import torchvision as tv

            return tv
        except (ImportError, RuntimeError):
            for name in [m for m in sys.modules if m.partition(".")[0] == "torchvision"]:
                del sys.modules[name]
            for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
                sys.modules[name] = types.ModuleType(name)
            return pytest.importorskip("torchvision")
    return import_torchvision()
