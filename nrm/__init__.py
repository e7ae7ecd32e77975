"""nrm: the Neural Rendering Model as an out-of-distribution scorer. Pure PyTorch.

    model = nrm.load("ckpt/")                      # safetensors + JSON, never pickle
    x = model.preprocess(uint8_images)             # (N, H, W[, C]) -> normalised (N, C, H, W)
    cols = model.score(x)                          # dict of per-sample tensors, see nrm.scores
"""

from nrm.checkpoint import CheckpointError, load, model_id, save
from nrm.config import ConfigError, InputSpec, ModelConfig
from nrm.convert import from_torch
from nrm.model import NRM, Latents, Rendering
from nrm.presets import PRESETS, preset
from nrm.scores import COLUMNS, HIGHER_IS_IN
from nrm.train import TrainConfig, TrainResult, train

__all__ = [
    "COLUMNS", "HIGHER_IS_IN", "NRM", "PRESETS", "CheckpointError", "ConfigError", "InputSpec", "Latents",
    "ModelConfig", "Rendering", "TrainConfig", "TrainResult", "from_torch", "load", "model_id",
    "preset", "save", "train",
]
