"""How a model runs: its device, numeric precision, memory layout and torch.compile.

    runner = Runner(nrm.load(path), device="cuda", precision="bf16", compile=True)
    plan = runner.model.plan(columns)          # nrm.plan: the columns, their passes, the threshold
    cols = runner.score(x, plan)               # normalised x (N, C, H, W); exactly plan.outputs
    ood_score, is_ood = plan.flag(cols)

The job's scoring actor, ``nrm-ood bench``, ``fit-detector`` and training run their models through a
Runner; the model (nrm.model) holds the network, its passes and its fitted state. A Runner sets its
model's weights to its memory layout when made: run one model through one Runner at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nrm.plan import ScorePlan
from nrm.precision import autocast as precision_context
from nrm.precision import check as check_precision

if TYPE_CHECKING:
    from nrm.model import NRM, Pass

LAYOUTS = ("fast", "channels_last", "nchw")


def fast_layout(device_type: str, precision: str) -> bool:
    """Whether channels-last (NHWC) scored faster than NCHW for this device and precision:
    channels-last on a CPU (oneDNN) and on CUDA for tf32 and the half precisions (cuDNN's tensor-core
    kernels are NHWC ones); NCHW for fp32 on CUDA, where cuDNN runs these float32 convolutions with
    NCHW kernels and channels-last only adds layout conversions (docs/benchmarks.md, GPU)."""
    return device_type != "cuda" or precision != "fp32"


class Runner:
    """Runs ``model`` on ``device`` (default: where it is) in ``precision`` (nrm.names.PRECISIONS),
    memory ``layout`` ("fast": :func:`fast_layout`; "channels_last"; "nchw"; None: the weights as
    they are and the inputs as given), and with ``compile`` through torch.compile (inductor).

    Compiled, each scoring pass (forward-only, or the full table's forward and top-down walk as one
    graph) compiles once per input shape (tens of seconds on a small CPU), so it pays over a long job,
    not a test; scores equal the eager ones to float rounding. On a CPU inductor writes C++ kernels,
    so a C++ compiler must run here (RuntimeError at once, not at the first batch). Training and
    ``NRM.render`` stay eager (see ``NRM.autograd_pass``)."""

    def __init__(self, model: NRM, device: str | torch.device | None = None, precision: str = "fp32",
                 layout: str | None = "fast", compile: bool = False):
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"unknown memory layout {layout!r}; expected one of {list(LAYOUTS)} or None")
        self.model = model if device is None else model.to(device)
        self.device = self.model.mean.device
        self.precision = check_precision(precision)
        self.channels_last = fast_layout(self.device.type, precision) if layout == "fast" else layout == "channels_last"
        if layout is not None:  # the 4-D weights in the inputs' format
            self.model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)  # type: ignore[call-overload]
        if compile and self.device.type == "cpu":
            _check_cpp_compiler()
        self.compiled = compile
        self._passes: dict[str, Callable[..., Any]] = {}  # pass name -> its torch.compile'd function

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every pass of this runner runs in (nrm.precision)."""
        return precision_context(self.precision, self.device.type)

    def to_layout(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in the runner's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def forward(self, x: Tensor) -> Tensor:
        """The plain classifier: logits (N, K) of normalised x."""
        with self.autocast():
            return self.model(self.to_layout(x))

    __call__ = forward

    @torch.no_grad()
    def score(self, x: Tensor, plan: ScorePlan | None = None) -> dict[str, Tensor]:
        """The score dict of ``plan`` (default: the model's full table) for normalised x (N, C, H, W):
        exactly ``plan.outputs``, float32 columns and int64 pred on the model's device."""
        plan = plan or self.model.plan()
        self.model.check_input(x)
        with self.autocast():
            p = self.passes(self.to_layout(x), plan)
        return self.model.tabulate(x, p, plan)

    def passes(self, x: Tensor, plan: ScorePlan) -> Pass:
        """The passes ``plan`` needs over x (already in the runner's layout), compiled if asked."""
        if plan.render:
            return self._pass("full")(self.model, x, plan.unit_stats, self.channels_last)
        return self._pass("forward")(self.model, x, plan.unit_stats)

    def _pass(self, name: str) -> Callable[..., Pass]:
        """The model's ``full_pass`` or ``forward_pass`` as an unbound function (a bound one would hold
        the model), through torch.compile once per runner when compiled."""
        fn = type(self.model).full_pass if name == "full" else type(self.model).forward_pass
        if not self.compiled:
            return fn
        if name not in self._passes:
            self._passes[name] = torch.compile(fn)
        return self._passes[name]


def as_runner(model: NRM | Runner) -> Runner:
    """``model`` if it is a Runner, else one that runs the model as ``NRM.score`` does: eager, in
    strict float32, its weights and inputs as they are."""
    return model if isinstance(model, Runner) else Runner(model, layout=None)


def _check_cpp_compiler() -> None:
    """Raise, in one sentence, when torch.compile cannot build CPU kernels: no C++ compiler runs."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        raise RuntimeError(f"compiling on a CPU needs a C++ compiler, as torch.compile writes C++ kernels, and none "
                           f"runs here ({e}): install g++ (or set CXX) or score without compiling") from None
