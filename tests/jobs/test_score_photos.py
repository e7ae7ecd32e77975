"""A torchvision ResNet-18 (random weights) converted with the ImageNet preprocessing and scored by the
job over full-size photos: every row ok, max_logit equal to torchvision's own eval pipeline."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from photos import photo_bytes, photo_rows, torchvision, write_photos
from PIL import Image
from support import make_checkpoint, outputs_of

import nrm
from jobs.pipeline import RunResult, ScoreOptions, run_score
from nrm.config import input_preset

pytestmark = [pytest.mark.ray, pytest.mark.data, pytest.mark.usefixtures("ray_local")]
IMAGENET = input_preset("imagenet")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """torchvision's ResNet-18 (seed 0) and its NRM checkpoint with the ImageNet preset, by nrm.from_torch."""
    torch.manual_seed(0)
    net = torchvision().models.resnet18(weights=None).eval()
    model = nrm.from_torch(net, IMAGENET.shape, mean=IMAGENET.mean, std=IMAGENET.std)
    model.config.input = IMAGENET
    path = tmp_path_factory.mktemp("resnet18") / "ckpt"
    nrm.save(model, path)
    return net, path


@pytest.fixture(scope="module")
def rows() -> list[int]:
    return photo_rows("RGB", 3, 0, 300) + photo_rows("RGB", 2, 1000) + photo_rows("L", 2)


def run(ckpt: Path, rows: list[int], tmp: Path, **kw: Any) -> tuple[RunResult, dict[str, np.ndarray]]:
    data = write_photos(tmp / "in" / "photos.parquet", rows)
    r = run_score(ScoreOptions(str(ckpt), str(data), str(tmp / "out"), run_id="r", batch_size=4,
                               columns=("max_logit",), **kw), echo=lambda _m: None)
    t = pa.concat_tables([pq.read_table(o["uri"]) for o in outputs_of(r.manifest)]).sort_by("source_row").to_pydict()
    return r, {k: np.asarray(v) for k, v in t.items()}


@pytest.mark.slow
def test_resnet18_scores_every_photo_with_torchvisions_max_logit(resnet: tuple[torch.nn.Module, Path],
                                                                  rows: list[int], tmp_path: Path) -> None:
    net, ckpt = resnet
    t = torchvision().transforms
    pipe = t.Compose([t.Resize(256), t.CenterCrop(224), t.ToTensor(), t.Normalize(IMAGENET.mean, IMAGENET.std)])
    with torch.no_grad():
        x = torch.stack([pipe(Image.open(io.BytesIO(photo_bytes(r))).convert("RGB")) for r in rows])
        expected = net(x).max(1).values.double().numpy()
    _, out = run(ckpt, rows, tmp_path)
    assert list(out["status"]) == ["ok"] * len(rows)
    np.testing.assert_allclose(out["max_logit"].astype(float), expected, rtol=1e-4, atol=1e-4)


def test_a_fast_run_records_its_decode_mode(tmp_path: Path) -> None:
    r, _ = run(make_checkpoint(tmp_path / "tiny"), photo_rows("RGB", 2, 1000), tmp_path, decode="fast")
    assert r.manifest["decode"] == "fast"
