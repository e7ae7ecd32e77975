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
from nrm.convert import state_dict_prefix_free


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


def convert(module_spec: str, weights: Path | None, input_shape: tuple[int, int, int], mean: Sequence[float] | None,
            std: Sequence[float] | None, classes: Sequence[str] | None, out: Path) -> tuple[nrm.NRM, str]:
    """Build, load, convert and save; returns the NRM and its model_id."""
    net = build_module(module_spec)
    if weights is not None:
        try:
            net.load_state_dict(read_weights(weights))
        except RuntimeError as e:
            raise ConvertError(f"--weights {weights} does not fit {module_spec}: {str(e).splitlines()[0]}") from None
    model = nrm.from_torch(net.eval(), input_shape, classes, mean, std)
    return model, nrm.save(model, out)
