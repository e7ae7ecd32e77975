"""Exact against fast JPEG decode on the shared full-size ImageNet photos: speed, and what it does to scores.

    python scripts/photo_bench.py [--photos PARQUET] [--repeats 3] [--section decode|scores|all] [--out JSON]

decode: images/s of one process on one core (torch and Pillow single-threaded), decoding every photo
to the ImageNet preset's input (resize 256, centre crop 224, bilinear) exactly and fast (Pillow's
draft: libjpeg's DCT scaling to no less than the resize needs), over all photos and over those
whose shorter side is at least twice the resize (the only ones fast decode scales). The two modes
alternate photo by photo, in the same process, so a busy machine slows both alike.
scores: a randomly initialised torchvision ResNet-18 (seed 0; no pretrained weights exist here),
converted by nrm.from_torch at 224 with the preset; its default detector (nrm.names.DEFAULT_DETECTOR
on DEFAULT_FEATURES) fitted on the first half of the photos decoded exactly; on the second half,
max_logit and the detector's column from exact and from fast pixels compared: Spearman's rank
correlation and the largest absolute change (also relative to the column's spread).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from jobs.images import Policy, Target, decode_encoded
from nrm.config import input_preset
from nrm.names import DEFAULT_DETECTOR, DEFAULT_FEATURES, DETECTOR_PREFIX

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "imagenet-samples" / "photos"
SPEC = input_preset("imagenet")


def photos(path: Path) -> list[bytes]:
    return [c["bytes"] for c in pq.read_table(path, columns=["image"]).column("image").to_pylist()]


def decode_speed(data: list[bytes], repeats: int) -> dict[str, dict[str, float]]:
    """Images/s of each mode over ``repeats`` passes of every photo (the modes alternating photo by
    photo), over all photos and over those fast decode scales (shorter side at least twice the resize)."""
    targets = {m: Target.of(SPEC, m) for m in ("exact", "fast")}
    spent = {m: np.zeros(len(data)) for m in targets}
    for r in range(repeats):
        for i, cell in enumerate(data):
            order = list(targets) if (i + r) % 2 == 0 else list(targets)[::-1]
            for mode in order:
                t0 = time.perf_counter()
                decode_encoded(cell, targets[mode], Policy.adapt)
                spent[mode][i] += time.perf_counter() - t0
    scaled = np.array([min(Image.open(io.BytesIO(c)).size) >= 2 * (SPEC.resize or 0) for c in data])
    out = {}
    for name, rows in (("all", np.ones(len(data), bool)), ("scaled", scaled)):
        n = int(rows.sum()) * repeats
        out[name] = {"photos": int(rows.sum()), **{f"{m}_images_per_s": n / s[rows].sum() for m, s in spent.items()},
                     "speedup": spent["exact"][rows].sum() / spent["fast"][rows].sum()}
    return out


def resnet18() -> torch.nn.Module:
    """torchvision's ResNet-18, random weights (seed 0), importable beside a CPU torch (see the module docs)."""
    try:
        from jobs.torchvision_compat import import_module
    except ImportError:
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules.setdefault(name, types.ModuleType(name))
        import importlib

        import_module = importlib.import_module
    torch.manual_seed(0)
    return import_module("torchvision.models").resnet18(weights=None).eval()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def score_effect(data: list[bytes]) -> dict[str, dict[str, float]]:
    import nrm
    from nrm.fit import refit
    from nrm.runner import Runner

    model = nrm.from_torch(resnet18(), SPEC.shape, mean=SPEC.mean, std=SPEC.std)
    model.config.input = SPEC
    runner = Runner(model)

    def pixels(rows: list[bytes], mode: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([decode_encoded(c, Target.of(SPEC, mode), Policy.adapt)[0] for c in rows]))

    def normalised(px: torch.Tensor) -> list[torch.Tensor]:
        return [model.preprocess(px[i:i + 50]) for i in range(0, len(px), 50)]

    half = len(data) // 2
    refit(runner, normalised(pixels(data[:half], "exact")), DEFAULT_DETECTOR, DEFAULT_FEATURES)
    column = DETECTOR_PREFIX + DEFAULT_DETECTOR
    plan = model.plan(("max_logit", column))
    cols, px = {}, {}
    for mode in ("exact", "fast"):
        px[mode] = pixels(data[half:], mode)
        parts = [runner.score(x, plan) for x in normalised(px[mode])]
        cols[mode] = {c: torch.cat([p[c] for p in parts]).double().numpy() for c in ("pred", "max_logit", column)}
    out: dict[str, dict[str, float]] = {
        "rows": {"compared": len(px["exact"]), "pixels_changed": int((px["exact"] != px["fast"]).flatten(1).any(1).sum()),
                 "pred_changed": int((cols["exact"]["pred"] != cols["fast"]["pred"]).sum())}}
    for c in ("max_logit", column):
        a, b = cols["exact"][c], cols["fast"][c]
        change = np.abs(a - b)
        out[c] = {"rows": len(a), "spearman": spearman(a, b), "max_abs_change": float(change.max()),
                  "max_change_over_iqr": float(change.max() / np.subtract(*np.percentile(a, [75, 25])))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=PHOTOS / "part-00000.parquet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--section", choices=("decode", "scores", "all"), default="all")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the scores section")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = photos(a.photos)
    result: dict[str, object] = {"photos": len(data), "preset": "imagenet"}
    if a.section in ("decode", "all"):
        result["decode"] = decode_speed(data, a.repeats)
        print(json.dumps(result["decode"]), flush=True)
    if a.section in ("scores", "all"):
        torch.set_num_threads(a.threads)
        result["scores"] = score_effect(data)
        print(json.dumps(result["scores"]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
