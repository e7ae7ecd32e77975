"""The read tasks: decode threads inside a task, and the CPUs per read task a run takes by default."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from support import png_bytes, random_images

from jobs.images import Policy
from jobs.pipeline.read import ReadSpec, decode_rows
from jobs.pipeline.run import default_read_cpus
from jobs.storage import Store


def hf_column(n: int, bad: int) -> pa.ChunkedArray:
    cells: list[bytes] = [png_bytes(p) for p in random_images(n, size=10, seed=4)]
    cells[bad] = b"not an image"
    return pa.chunked_array([pa.array([{"bytes": c, "path": None} for c in cells])])


def test_decode_threads_give_the_rows_of_one_thread_in_order() -> None:
    col = hf_column(200, bad=77)
    one, four = (ReadSpec(Store(), (1, 8, 8), Policy.adapt, threads=t) for t in (1, 4))
    adapt1, adapt4 = np.zeros(200, np.uint8), np.zeros(200, np.uint8)
    px1, err1 = decode_rows(col, "hf", one, adapt1)
    px4, err4 = decode_rows(col, "hf", four, adapt4)
    assert (px4 == px1).all() and (adapt4 == adapt1).all()
    assert [i for i, e in enumerate(err4) if e] == [i for i, e in enumerate(err1) if e] == [77]
    assert adapt4.any()  # 10x10 images resized to the model's 8x8: every slice wrote its rows' flags


@pytest.mark.parametrize(("cpus", "gpus", "want"), [(2, 0, 0.5), (64, 0, 0.5), (16, 1, 3.0), (4, 1, 1.0), (64, 2, 4.0)])
def test_default_read_cpus_follow_the_cpus_per_gpu(cpus: float, gpus: float, want: float) -> None:
    assert default_read_cpus(cpus, gpus, cpus_per_actor=1.0) == want
