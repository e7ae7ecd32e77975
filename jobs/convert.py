"""Bring your own model: load a user's model file and weights, convert with nrm.from_torch, save.

The module comes from a factory: the user's own Python file (``path/to/file.py:factory``) or an
importable module (``torchvision.models:resnet50``, ``timm:create_model`` with ``model_name=...``),
called once with the keyword arguments of ``--module-kwargs`` (Python literals). torchvision, and what
imports it, is imported through jobs.torchvision_compat. Weights are read without unpickling
(safetensors, or a .pt/.pth state dict through ``torch.load(weights_only=True)``). Class names come
from ``--classes`` or ``--classes-file`` (one per line, or a JSON list), checked against the outputs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import nrm
from jobs.torchvision_compat import import_module
from nrm.config import InputSpec
from nrm.convert import state_dict_prefix_free
from nrm.names import INPUT_PRESETS, INTERPOLATIONS

SPEC = "path/to/file.py:factory or package.module:factory"


class ConvertError(ValueError):
    """A model file, factory or weights file that cannot be used; the message says which and why."""


def parse_kwargs(text: str) -> dict[str, Any]:
    """``num_classes=100,width_per_group=64`` -> {"num_classes": 100, "width_per_group": 64}: name=value
    pairs, each value a Python literal (number, 'string', True/False/None, or a tuple, list or dict of
    them; commas inside them are fine). ValueError names the pair that is not one."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise ValueError(f"expected name=value pairs separated by commas, e.g. num_classes=100,width_per_group=64, "
                         f"got {text!r}")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        try:
            out[str(kw.arg)] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(f"{kw.arg}={ast.get_source_segment(f'f({text})', kw.value)}: the value is not a Python "
                             f"literal (a number, a quoted string, True, False, None, or a tuple, list or dict of "
                             f"them)") from None
    return out


def read_classes(path: Path) -> list[str]:
    """Class names in logit order from ``path``: a JSON list, or one name per line (blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"--classes-file {path}: cannot be read as UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"--classes-file {path}: starts with '[' but is not a JSON list ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str | int) for n in names):
            raise ConvertError(f"--classes-file {path}: expected a JSON list of class names (strings)")
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _import_target(spec: str, target: str) -> tuple[ModuleType, str]:
    """The module that holds the factory, and how to name it in errors."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise ConvertError(f"--module {spec!r}: no file {path}")
        name = f"_nrm_user_model_{abs(hash(path.resolve()))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ConvertError(f"--module {spec!r}: {path} is not an importable Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
        return module, str(path)
    try:
        return import_module(target), target
    except ImportError as e:
        raise ConvertError(f"--module {spec!r}: cannot import {target} ({type(e).__name__}: {e}); expected "
                           f"{SPEC}") from None


def build_module(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``path/to/file.py:factory`` or ``package.module:factory`` -> factory(**kwargs) (an nn.Module)."""
    target, sep, factory = spec.rpartition(":")
    if not sep or not target or not factory:
        raise ConvertError(f"--module {spec!r}: expected {SPEC}")
    module, where = _import_target(spec, target)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ConvertError(f"--module {spec!r}: {where} has no callable {factory!r}")
    kwargs = kwargs or {}
    call = f"{factory}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        net = fn(**kwargs)
    except (TypeError, ValueError) as e:  # a keyword the factory does not take, or a value it refuses
        raise ConvertError(f"--module {spec!r}: {call} failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(net, nn.Module):
        raise ConvertError(f"--module {spec!r}: {call} returned {type(net).__name__}, expected an nn.Module")
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


def convert(module_spec: str, weights: Path | None, spec: InputSpec, classes: Sequence[str] | None, out: Path,
            module_kwargs: dict[str, Any] | None = None, classes_from: str = "--classes") -> tuple[nrm.NRM, str]:
    """Build, load, convert and save with the input ``spec`` (size, preprocessing); returns the NRM and
    its model_id. ``classes_from`` names the option the class names came from, for the error when their
    count is not the network's outputs."""
    net = build_module(module_spec, module_kwargs)
    if weights is not None:
        try:
            net.load_state_dict(read_weights(weights))
        except RuntimeError as e:
            raise ConvertError(f"--weights {weights} does not fit {module_spec}: {str(e).splitlines()[0]}") from None
    model = nrm.from_torch(net.eval(), spec.shape, None, spec.mean, spec.std)
    model.config.input = spec  # the same size and normalisation, with the resize and crop
    if classes is not None:
        if len(classes) != len(model.config.classes):
            raise ConvertError(f"{classes_from}: {len(classes)} class names, but the network has "
                               f"{len(model.config.classes)} outputs")
        model.config.classes = [str(c) for c in classes]
    return model, nrm.save(model, out)
