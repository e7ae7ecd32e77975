"""nrm: the Neural Rendering Model as an out-of-distribution scorer. Pure PyTorch.

    model = nrm.load("ckpt/")                      # safetensors + JSON, never pickle
    x = model.preprocess(uint8_images)             # (N, H, W[, C]) -> normalised (N, C, H, W)
    cols = model.score(x)                          # dict of per-sample tensors, see nrm.scores

    runner = nrm.Runner(model, precision="bf16")   # how it runs: device, precision, layout, compile
    plan = model.plan(["max_softmax"])             # which columns, which passes, which column flags OOD
    ood_score, is_ood = plan.flag(runner.score(x, plan))

The names below are imported on first use (PEP 562), so that ``import nrm.names`` (the choices the
command line offers) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "CheckpointError": "checkpoint", "load": "checkpoint", "model_id": "checkpoint", "save": "checkpoint",
    "ConfigError": "config", "InputSpec": "config", "ModelConfig": "config",
    "from_torch": "convert",
    "NRM": "model", "Latents": "model", "Pass": "model", "Rendering": "model",
    "ScorePlan": "plan", "Runner": "runner",
    "PRESETS": "presets", "preset": "presets",
    "COLUMNS": "scores", "HIGHER_IS_IN": "scores",
    "TrainConfig": "training", "TrainResult": "training", "train": "training",
}
__all__ = [
    "COLUMNS", "HIGHER_IS_IN", "NRM", "PRESETS", "CheckpointError", "ConfigError", "InputSpec", "Latents",
    "ModelConfig", "Pass", "Rendering", "Runner", "ScorePlan", "TrainConfig", "TrainResult", "from_torch", "load",
    "model_id", "preset", "save", "train",
]

if TYPE_CHECKING:
    from nrm.checkpoint import CheckpointError, load, model_id, save
    from nrm.config import ConfigError, InputSpec, ModelConfig
    from nrm.convert import from_torch
    from nrm.model import NRM, Latents, Pass, Rendering
    from nrm.plan import ScorePlan
    from nrm.presets import PRESETS, preset
    from nrm.runner import Runner
    from nrm.scores import COLUMNS, HIGHER_IS_IN
    from nrm.training import TrainConfig, TrainResult, train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nrm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nrm.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
