"""Test helpers shared by the suites (imported as `support`; pytest puts tests/ on sys.path).

Everything is local: Ray runs embedded with 2 CPUs; S3 is moto's real HTTP server on 127.0.0.1,
and both boto3 and pyarrow talk to it through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import Tensor

import nrm
from nrm.config import InputSpec, ModelConfig
from nrm.graph import chain
from nrm.ops import Conv, Flatten, GlobalAvgPool, Linear, MaxPool, ReLU
from nrm.plan import ScorePlan
from nrm.runner import Runner

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
FAKE_KEY_ID = "AKIAFAKEFAKEFAKE1234"
FAKE_SECRET = "fakeSecret/DoNotLeak+0123456789abcdefghij"


def tiny_config(channels: int = 1, size: int = 8, classes: int = 3) -> ModelConfig:
    layers = chain(("conv1", Conv(channels, 4, 3, 1, 1)), ReLU(), MaxPool(2, 2), ("conv2", Conv(4, 6, 3, 1, 1)), ReLU(),
                   GlobalAvgPool(), Flatten(), ("classifier", Linear(6, classes)))
    return ModelConfig(InputSpec(channels, size, size, (0.5,) * channels, (0.25,) * channels),
                       [f"c{i}" for i in range(classes)], layers)


def make_checkpoint(path: Path, channels: int = 1, size: int = 8, classes: int = 3, seed: int = 0) -> Path:
    """A randomly initialised tiny NRM with fitted state, saved at ``path``."""
    from nrm.fit import fit

    torch.manual_seed(seed)
    model = nrm.NRM(tiny_config(channels, size, classes)).eval().requires_grad_(False)
    x = torch.randn(64, channels, size, size)
    fit(model, [x], [x])
    nrm.save(model, path)
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(buf, "PNG")
    return buf.getvalue()


def write_hf_parquet(path: Path | str, images: list[bytes | None], labels: list[int] | None = None,
                     row_group_size: int = 1000, filesystem: object = None) -> None:
    """Hugging Face image layout: image struct<bytes, path>, label int64."""
    cells = [None if b is None else {"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)]
    cols: dict[str, object] = {"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    pq.write_table(pa.table(cols), str(path), row_group_size=row_group_size, filesystem=filesystem)


def random_images(n: int, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset_dir(name: str) -> Path:
    p = DATASETS / name
    if not p.is_dir():
        pytest.skip(f"shared dataset {name!r} not found at {p} (see shared/datasets/README.md)")
    return p


def assert_same_config(a: ModelConfig, b: ModelConfig) -> None:
    """Two configs serialise alike: equal config.json contents and bit-equal detector tensors."""
    (ja, ta), (jb, tb) = a.to_json(), b.to_json()
    assert ja == jb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype == torch.float64, k
        assert torch.equal(ta[k], tb[k]), k


def outputs_of(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The output files a committed manifest names (read from its Parquet list beside it)."""
    from jobs import manifest
    from jobs.storage import Store

    return manifest.outputs(Store(), m)


def inputs_of(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The readable input files a committed manifest names."""
    from jobs import manifest
    from jobs.storage import Store

    return manifest.inputs(Store(), m)


def autograd_of(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d logit_y / dx of a torch module (a user's original, or an NRM's plain forward), logit_y and all
    the logits, from one forward and one backward pass."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = net(xg)
        picked = logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(picked.sum(), xg)
    return grad, picked.detach(), logits.detach()


class OutOfMemoryAbove(Runner):
    """A Runner that runs out of memory on a piece of more than ``limit`` rows, or on any piece holding a
    row whose first pixel is ``poison`` (a row that never fits); it records the rows of each piece it scored."""

    def __init__(self, model: nrm.NRM, limit: int, poison: float | None = None):
        super().__init__(model)
        self.limit, self.poison = limit, poison
        self.scored_rows: list[int] = []

    def score(self, x: Tensor, plan: ScorePlan | None = None) -> dict[str, Tensor]:
        if len(x) > self.limit or (self.poison is not None and bool((x[:, 0, 0, 0] == self.poison).any())):
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows")
        self.scored_rows.append(len(x))
        return super().score(x, plan)
