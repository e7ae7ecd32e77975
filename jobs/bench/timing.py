"""Timing helpers of `nrm-ood bench` (and the scripts that time things the same way): best-of-N
wall time after a warm-up, the device's sync, the user's module at its fastest, and the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

import nrm
from nrm.config import ModelConfig

Echo = Callable[[str], None]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def best_time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)  # the VM's steal time only ever adds: the best run is the least noisy estimate


def device_sync(device: str | torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read (nothing on a CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def random_model(cfg: ModelConfig, device: str = "cpu") -> nrm.NRM:
    torch.manual_seed(0)
    return nrm.NRM(cfg).to(device).eval().requires_grad_(False)


def fastest(fns: dict[str, Callable[[], Any]], reps: int) -> tuple[float, str]:
    """(best-run seconds, label) of the fastest of ``fns``: plain inference is always the best we can do."""
    times = {label: best_time(fn, reps) for label, fn in fns.items()}
    label = min(times, key=lambda k: times[k])
    return times[label], label


def plain_variants(module: torch.nn.Module, x: torch.Tensor, sync: Callable[[], None],
                   precision: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                   ) -> dict[str, Callable[[], Any]]:
    """The user's torch module as it runs fastest: as given, with BatchNorm fused into the convs
    (torch.fx's own fusion, where the module traces), in either memory format; each run inside
    ``precision()`` (the NRM's own, so that both sides compute in the same precision)."""
    import copy

    variants: dict[str, torch.nn.Module] = {"as given": module}
    try:
        from torch.fx.experimental.optimization import fuse

        variants["BN fused"] = fuse(copy.deepcopy(module))
    except Exception:  # noqa: BLE001 - a module fx cannot trace keeps its unfused forward
        pass
    xcl = x.contiguous(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], Any]] = {}
    for label, mod in variants.items():
        mcl = copy.deepcopy(mod).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

        def run(m: torch.nn.Module = mod, inp: torch.Tensor = x) -> None:
            with torch.no_grad(), precision():
                m(inp)
            sync()

        def run_cl(m: torch.nn.Module = mcl, inp: torch.Tensor = xcl) -> None:
            with torch.no_grad(), precision():
                m(inp)
            sync()

        fns[label] = run
        fns[f"{label}, channels_last"] = run_cl
    return fns


def first_call(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
