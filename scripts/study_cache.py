"""Score every split of the default-detector study once per network and cache the columns
(docs/study-default-detector.md section 2 lists the splits).

    python scripts/study_cache.py NAME=CKPT:IN_SET [...] --cache /work/scratch/study32/cache \
        --aux /work/scratch/study32/data

IN_SET is cifar10, mnist or fashion_mnist. ``--aux`` holds the files scripts/split_textures.py and
scripts/make_noise.py write (textures32-val/-report, noise32(-val), noise28(-val)). For each network
it writes CACHE/NAME/<split>.pt, a dict of CPU tensors: pred, max_softmax, max_logit, energy,
logits (N, K), feats (N, F) (the penultimate features), latent_gates and unit_acts (N, sum_l C_l),
label where the rows are labelled, and on the rendered splits also the top-down pass's columns
(latent_prior(_layers), latent_loglik, recon_sq_error, loglik_bound, latent_prior_channels).
A split whose file exists is not scored again. Scoring is float32 in the fast layout, as
`nrm-ood fit-detector` scores.

Splits (train/held-out rows: `nrm-ood train`'s seed-0 permutation, 10% held out):
    train          every training row not held out, forward pass only
    held           the held-out rows (validation in-distribution), rendered
    val_<set>      validation OOD: CIFAR-10 nets tin (TinyImageNet train_sample, first 2,000),
                   textures (textures32-val), noise (seed 3); gray nets the sibling's train split
                   (first 2,000), textures, noise; rendered
    syn_<t>        synthetic OOD (nrm.synthetic) from the last --syn training rows, forward only
    test_in        report in-distribution: the first 2,000 rows of the test split, rendered
    test_<set>     report OOD, first 2,000 rows each: CIFAR-10 nets tin (val_ood, near), textures
                   (textures32-report), mnist, fmnist (test), noise (seed 1) (far), tinjpeg (tin
                   re-encoded as JPEG quality 75: beside the groups); gray nets the
                   sibling's test split (near), textures, noise (seed 2) (far); rendered
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nrm  # noqa: E402
from jobs.datasets import load_images, load_labelled  # noqa: E402
from nrm.runner import Runner  # noqa: E402
from nrm.synthetic import synthetic  # noqa: E402
from nrm.training import held_out_split  # noqa: E402

DATA = Path("/work/shared/datasets")
LIMIT = 2000  # rows of each validation / report set (section 6's --limit and --val-ood-limit)
FORWARD = ["pred", "max_softmax", "max_logit", "energy"]
RELU_TRAIN = 20000  # training rows of the --relu cache
SIBLING = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}


def sets(in_set: str, aux: Path) -> dict[str, str]:
    """split name -> Parquet URI of every validation and report set of a network trained on ``in_set``."""
    if in_set == "cifar10":
        return {"val_tin": f"{DATA}/tinyimagenet/train_sample", "val_textures": f"{aux}/textures32-val",
                "val_noise": f"{aux}/noise32-val", "test_in": f"{DATA}/cifar10/test",
                "test_tin": f"{DATA}/tinyimagenet/val_ood", "test_textures": f"{aux}/textures32-report",
                "test_mnist": f"{DATA}/mnist/test", "test_fmnist": f"{DATA}/fashion_mnist/test",
                "test_noise": f"{aux}/noise32"}
    sib = SIBLING[in_set]
    return {f"val_{sib}": f"{DATA}/{sib}/train", "val_textures": f"{aux}/textures32-val", "val_noise": f"{aux}/noise28-val",
            "test_in": f"{DATA}/{in_set}/test", f"test_{sib}": f"{DATA}/{sib}/test",
            "test_textures": f"{aux}/textures32-report", "test_noise": f"{aux}/noise28"}


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Each uint8 image (N, H, W, 3) encoded as JPEG at ``quality`` and decoded (PIL), as the shared
    CIFAR-10 was re-encoded ("quality about 75")."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for im in images.numpy():
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))))
    return torch.stack(out)


def relu_stats(m: nrm.NRM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """On-rate and mean of every ReLU node's output per channel (N, sum C): the network's own ReLU
    latents s*(l), which for a ResNet include the ReLUs after the residual adds (the bias nodes'
    statistics, latent_gates / unit_acts, read the conv outputs before those adds)."""
    lat = m.encode(x)
    rates, means = [], []
    for name, gate in lat.latents.items():
        if gate.dim() != 4 or gate.shape != lat.values[name].shape:
            continue  # max-pool switches
        rates.append(gate.float().mean(dim=(2, 3)))
        means.append(lat.values[name].float().mean(dim=(2, 3)))
    return {"relu_gates": torch.cat(rates, 1), "relu_acts": torch.cat(means, 1)}


def score_batch(r: Runner, x: torch.Tensor, render: bool) -> dict[str, torch.Tensor]:
    """Every cached column of one normalised batch, as the runner scores it: the full table (or the
    forward columns) with the unit statistics, the penultimate features (as ``feats``) and the logits."""
    inputs = ("latent_gates", "unit_acts", "penultimate", "logits")
    cols = r.score(x, r.model.plan(None if render else FORWARD, inputs=inputs, flag=False))
    keep = {k: v for k, v in cols.items() if not k.startswith("det_") and k != "penultimate"}
    return {**keep, "feats": cols["penultimate"]}


@torch.no_grad()
def score_all(r: Runner, images: torch.Tensor, render: bool, labels: torch.Tensor | None = None,
              batch: int = 500, relu: bool = False) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    step = 100 if relu else batch  # encode keeps every node's output
    for i in range(0, len(images), step):
        x = r.model.preprocess(images[i : i + step])
        for k, v in (relu_stats(r.model, x) if relu else score_batch(r, x, render)).items():
            parts.setdefault(k, []).append(v.cpu())
    out = {k: torch.cat(v) for k, v in parts.items()}
    if labels is not None:
        out["label"] = labels
    return out


def cache_network(name: str, ckpt: str, in_set: str, cache: Path, aux: Path, syn_rows: int, relu: bool,
                  only: list[str] | None = None, train_rows: int | None = None) -> None:
    """Every split of one network; with ``relu`` the ReLU-node statistics instead (CACHE/NAME/relu/,
    training rows: the first RELU_TRAIN only)."""
    r = Runner(nrm.load(ckpt))  # float32 in the fast layout, as `nrm-ood fit-detector` scores
    m = r.model
    out = cache / name / "relu" if relu else cache / name
    out.mkdir(parents=True, exist_ok=True)
    x, y = (torch.from_numpy(a) for a in load_labelled(f"{DATA}/{in_set}/train", m.input_shape))
    held, train = held_out_split(len(x), 0.1, torch.Generator().manual_seed(0))
    Job = tuple[Callable[[], torch.Tensor], torch.Tensor | None, bool]  # images, labels, rendered
    jobs: dict[str, Job] = {"held": (lambda: x[held], y[held], True)}
    for split, uri in sets(in_set, aux).items():
        if split == "test_in":
            xi, yi = (torch.from_numpy(a) for a in load_labelled(uri, m.input_shape, LIMIT))
            jobs[split] = (lambda xi=xi: xi, yi, True)
        else:
            jobs[split] = (lambda uri=uri: torch.from_numpy(load_images(uri, m.input_shape, LIMIT)), None, True)
    if in_set == "cifar10":  # near-OOD with CIFAR-10's compression (docs/study-default-detector.md section 6)
        near = sets(in_set, aux)["test_tin"]
        jobs["test_tinjpeg"] = (lambda: jpeg(torch.from_numpy(load_images(near, m.input_shape, LIMIT))), None, True)
    for t, images in synthetic(x[train[-syn_rows:]]).items():
        jobs[f"syn_{t}"] = (lambda images=images: images, None, False)
    keep = train[:RELU_TRAIN] if relu else train[:train_rows]
    jobs["train"] = (lambda: x[keep], y[keep], False)
    for split, (images, labels, render) in jobs.items():
        path = out / f"{split}.pt"
        if path.exists() or (only and split not in only):
            continue
        t0 = time.perf_counter()
        cols = score_all(r, images(), render, labels, relu=relu)
        torch.save(cols, path)
        print(f"{name} {'relu ' if relu else ''}{split}: {len(next(iter(cols.values())))} rows, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("networks", nargs="+", help="NAME=CKPT:IN_SET")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--aux", type=Path, required=True)
    ap.add_argument("--syn", type=int, default=1000, help="training rows each synthetic set is made from")
    ap.add_argument("--relu", action="store_true", help="cache the ReLU-node statistics (relu_stats) instead")
    ap.add_argument("--only", action="append", help="cache only this split (repeatable)")
    ap.add_argument("--train-rows", type=int, default=None, help="the train split's first rows only (default: all)")
    a = ap.parse_args()
    for spec in a.networks:
        name, _, rest = spec.partition("=")
        ckpt, _, in_set = rest.rpartition(":")
        cache_network(name, ckpt, in_set, a.cache, a.aux, a.syn, a.relu, a.only, a.train_rows)


if __name__ == "__main__":
    main()
