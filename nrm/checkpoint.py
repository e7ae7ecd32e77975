"""Checkpoints: a directory with config.json and weights.safetensors. Nothing is ever unpickled.

config.json is the graph and the fitted state (format version 3; versions 1 and 2 still load, see
nrm.config); weights.safetensors holds every tensor: ``<node>.<param>`` for the network (node names
are module paths, so a converted ResNet keeps keys like ``layer1.0.conv1.weight``) and
``detector.<column>.<key>`` for the fitted detectors' arrays (``detector.*`` / ``posthoc.*`` in version 2).

``model_id`` is the sha256 of the network's weights (the fitted arrays beside them excluded): the job records it with every scored row, and
``load(path, expect_model_id=...)`` refuses a weights file whose hash does not match.
``load_bytes`` makes the same checks on the two files' bytes (the job fetches them from object
storage once and hands them to every actor).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from nrm.config import FITTED_PREFIXES, ConfigError, ModelConfig
from nrm.model import NRM

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of the checkpoint's whole weights file (network and fitted arrays): its integrity."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_id(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of the network's weights: of the safetensors serialisation of the network tensors
    alone, so refitting a detector or the baselines (whose arrays share the file) keeps the model_id.
    For a file without fitted arrays (every version-1 checkpoint) it is the file's own hash."""
    return weights_id((Path(path) / WEIGHTS).read_bytes())


def weights_id(weights: bytes) -> str:
    """The model_id of a weights file's bytes (see ``model_id``)."""
    return _model_id(weights, _tensors(weights)[0])


def _tensors(weights: bytes) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The tensors of a safetensors file's bytes, or (None, why not)."""
    try:
        return load_tensors(weights), ""
    except SafetensorError as e:
        return None, str(e)


def _model_id(weights: bytes, tensors: dict[str, torch.Tensor] | None) -> str:
    """model_id of a weights file from its bytes and its tensors (None: not a safetensors file: its hash)."""
    net = {k: v for k, v in (tensors or {}).items() if not k.startswith(FITTED_PREFIXES)}
    if tensors is None or len(net) == len(tensors):
        return hashlib.sha256(weights).hexdigest()
    return hashlib.sha256(save_bytes(net)).hexdigest()


def save(model: NRM, path: str | os.PathLike[str]) -> str:
    """Write ``model`` to directory ``path`` (created); returns its model_id."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    config, fitted = model.config.to_json()
    tensors = {k: v.cpu().contiguous() for k, v in fitted.items()}
    for node in model.config.nodes:
        for pname, t in model.node_params(node.name).items():
            tensors[f"{node.name}.{pname}"] = t.detach().float().cpu().contiguous()
    save_file(tensors, str(p / WEIGHTS))
    mid = model_id(p)
    checksum = file_sha256(p)
    # The weights' hash is recorded in config.json, so a swapped or edited weights file is detected on load.
    (p / CONFIG).write_text(json.dumps({**config, "weights_sha256": checksum}, indent=2) + "\n")
    return mid


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", expect_model_id: str | None = None
) -> NRM:
    """Load a checkpoint directory into an NRM in eval mode on ``device``."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a directory (expected one holding {CONFIG} and {WEIGHTS})")
    for name in (CONFIG, WEIGHTS):
        if not (p / name).is_file():
            raise CheckpointError(f"checkpoint {str(p)!r} has no {name}")
    try:
        config, weights = (p / CONFIG).read_bytes(), (p / WEIGHTS).read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(p)!r} cannot be read ({e})") from None
    return load_bytes(config, weights, device, expect_model_id, name=str(p))


def load_bytes(
    config: bytes, weights: bytes, device: str | torch.device = "cpu", expect_model_id: str | None = None,
    name: str = "checkpoint",
) -> NRM:
    """Load a checkpoint from the bytes of its two files (``CONFIG``, ``WEIGHTS``), e.g. as fetched
    from object storage, with every check of ``load``; errors name the checkpoint ``name``."""
    where = f"checkpoint {name!r}"
    tensors, unreadable = _tensors(weights)
    if expect_model_id is not None and (actual := _model_id(weights, tensors)) != expect_model_id:
        raise CheckpointError(
            f"{where}: {WEIGHTS} has sha256 {actual}, expected model_id {expect_model_id} (tampered or replaced)"
        )
    try:
        raw = json.loads(config)
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointError(f"{where}: {CONFIG} is not valid JSON ({e})") from None
    recorded = raw.pop("weights_sha256", None) if isinstance(raw, dict) else None
    if recorded is not None and (actual := hashlib.sha256(weights).hexdigest()) != recorded:
        raise CheckpointError(
            f"{where}: {WEIGHTS} has sha256 {actual}, but config.json records {recorded} (tampered or replaced)"
        )
    if tensors is None:
        raise CheckpointError(f"{where}: {WEIGHTS} is not a safetensors file ({unreadable})")
    try:
        cfg = ModelConfig.from_json(raw, {k: v for k, v in tensors.items() if k.startswith(FITTED_PREFIXES)})
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    model = NRM(cfg)
    _load_weights(model, {k: v for k, v in tensors.items() if not k.startswith(FITTED_PREFIXES)}, where)
    if not math.isfinite(cfg.fitted.sigma2):
        raise CheckpointError(f"{where}: sigma2 is not finite")
    return model.to(device).eval().requires_grad_(False)


def _load_weights(model: NRM, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``<node>.<param>`` tensors into the model; every mismatch names the tensor."""
    expected = {f"{n.name}.{k}": shape for n in model.config.nodes for k, shape in n.op.params().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: {WEIGHTS} is missing {missing} / has unexpected {extra}")
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}"
            )
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {key!r} has {bad} non-finite value(s)")
    with torch.no_grad():
        for key in expected:
            node, pname = key.rsplit(".", 1)
            model.node_params(node)[pname].copy_(tensors[key])
