"""Bring your own model: load a user's model file and weights, convert with nrm.from_torch, save.

The model file is the user's own Python (``path/to/file.py:factory``), imported once to build the
module; its weights are read without unpickling (safetensors, or a .pt/.pth state dict through
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import nrm
from nrm.config import InputSpec
from nrm.convert import state_dict_prefix_free
from nrm.names import INPUT_PRESETS, INTERPOLATIONS


class ConvertError(ValueError):
    """A model file, factory or weights file that cannot be used; the message says which and why."""


def build_module(spec: str) -> nn.Module:
    """``path/to/file.py:factory`` -> factory() (an nn.Module)."""
    path_s, sep, factory = spec.rpartition(":")
    if not sep or not path_s or not factory:
        raise ConvertError(f"--module {spec!r}: expected path/to/file.py:factory")
    path = Path(path_s)
    if not path.is_file():
        raise ConvertError(f"--module {spec!r}: no file {path}")
    name = f"_nrm_user_model_{abs(hash(path.resolve()))}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConvertError(f"--module {spec!r}: {path} is not an importable Python file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ConvertError(f"--module {spec!r}: {path} has no callable {factory!r}")
    net = fn()
    if not isinstance(net, nn.Module):
        raise ConvertError(f"--module {spec!r}: {factory}() returned {type(net).__name__}, expected an nn.Module")
    return net


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pt/.pth with torch.load(weights_only=True); never unpickles code."""
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        elif path.suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} checkpoint
        else:
            raise ConvertError(f"--weights {path}: expected a .safetensors, .pt or .pth file")
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConvertError(f"--weights {path}: cannot be read as a state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"--weights {path}: expected a state dict of tensors")
    return state_dict_prefix_free(state)


def input_spec(shape: tuple[int, int, int] | None, *, preset: str | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, resize: int | None = None, crop: tuple[int, int] | None = None,
               interpolation: str | None = None) -> InputSpec:
    """The input a converted model declares: ``preset``'s values (nrm.names.INPUT_PRESETS), each replaced
    by the option given. The network's input size is ``shape``'s H x W, else the crop's; channels are
    ``shape``'s, else one per mean value, else 3. Raises ConvertError (or nrm's ConfigError) naming the
    conflict."""
    base: dict[str, Any] = dict(INPUT_PRESETS[preset]) if preset else {}
    if shape is not None and crop is not None and tuple(crop) != shape[1:]:
        raise ConvertError(f"--crop {crop[0]},{crop[1]} differs from --input-shape {','.join(map(str, shape))}: the "
                           "network sees the crop, so its height and width must be the input's")
    if shape is None and crop is None and "crop" not in base:
        raise ConvertError("the network's input size is unknown: give --input-shape C,H,W, or --crop H[,W], or --preset")
    mean = mean or base.get("mean")
    size = shape[1:] if shape is not None else crop or base["crop"]
    channels = shape[0] if shape is not None else len(mean) if mean else 3
    return InputSpec(channels, size[0], size[1], tuple(mean or (0.0,) * channels),
                     tuple(std or base.get("std") or (1.0,) * channels),
                     resize=resize or base.get("resize"), crop=size if crop or "crop" in base else None,
                     interpolation=interpolation or base.get("interpolation", INTERPOLATIONS[0]))


def convert(module_spec: str, weights: Path | None, spec: InputSpec, classes: Sequence[str] | None,
            out: Path) -> tuple[nrm.NRM, str]:
    """Build, load, convert and save with the input ``spec`` (size, preprocessing); returns the NRM and
    its model_id."""
    net = build_module(module_spec)
    if weights is not None:
        try:
            net.load_state_dict(read_weights(weights))
        except RuntimeError as e:
            raise ConvertError(f"--weights {weights} does not fit {module_spec}: {str(e).splitlines()[0]}") from None
    model = nrm.from_torch(net.eval(), spec.shape, classes, spec.mean, spec.std)
    model.config.input = spec  # the same size and normalisation, with the resize and crop
    return model, nrm.save(model, out)
