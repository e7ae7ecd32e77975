"""nrm.runner: a model run in a precision, a memory layout and compiled scores as it does eager and
in float32, and hands its settings back."""

from __future__ import annotations

import pytest
import torch
from support import tiny_config

import nrm
from nrm.fit import refit
from nrm.runner import Runner


def _model() -> nrm.NRM:
    torch.manual_seed(0)
    return nrm.NRM(tiny_config(channels=1, size=8, classes=3)).eval().requires_grad_(False)


def test_a_runner_scores_as_the_model_does() -> None:
    model = _model()
    refit(model, [torch.randn(64, 1, 8, 8)])
    x = torch.randn(16, 1, 8, 8)
    plan = model.plan(["max_logit"])
    got, ref = Runner(model, layout="channels_last").score(x, plan), model.score(x, list(plan.columns))
    assert list(got) == ["pred", "max_logit", "det_mahalanobis"]
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_compiled_forward_only_columns_equal_the_eager_ones() -> None:
    """Runner(compile=True) (torch.compile of the forward-only pass and its gate statistics) changes no
    column beyond float rounding, with a fitted gate detector."""
    from torch._dynamo.utils import counters

    model = _model()
    refit(model, [torch.randn(64, 1, 8, 8)])
    x, cols = torch.randn(16, 1, 8, 8), ["pred", "max_softmax", "max_logit", "energy", "det_mahalanobis"]
    eager = model.score(x, columns=cols)
    counters.clear()
    runner = Runner(model, compile=True)
    compiled = runner.score(x, model.plan(cols, flag=False))
    assert "forward" in runner._passes  # the compiled pass ran
    assert not counters["graph_break"]  # one graph: a break recompiles per model and falls back to eager
    assert list(compiled) == cols
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-4, msg=k)


def test_compiling_on_a_cpu_without_a_cpp_compiler_fails_at_once_naming_it() -> None:
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",)}), \
            pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler.*/nonexistent/g\+\+.*install g\+\+"):
        Runner(_model(), compile=True)


def test_a_compiled_model_is_freed_when_dropped() -> None:
    import gc
    import weakref

    model = _model()
    runner = Runner(model, compile=True)
    runner.score(torch.randn(4, 1, 8, 8), model.plan(["pred", "max_logit"], flag=False))
    ref = weakref.ref(model)
    del model, runner
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True)])
def test_precision_sets_tf32_for_the_pass_and_restores_it(precision: str, tf32: bool) -> None:
    runner = Runner(nrm.NRM(tiny_config()), precision=precision)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = not tf32  # the opposite of what the pass must use
    try:
        with runner.autocast():
            inside = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        assert inside == (tf32, tf32)
        assert torch.backends.cudnn.allow_tf32 is (not tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fast_layout_on_a_cpu_is_channels_last(precision: str) -> None:
    runner = Runner(nrm.NRM(tiny_config()), precision=precision)
    assert runner.channels_last is True
    assert runner.model.node_params("conv1")["weight"].is_contiguous(memory_format=torch.channels_last)


def test_an_unknown_precision_or_layout_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'"):
        Runner(_model(), precision="fp8")
    with pytest.raises(ValueError, match=r"unknown memory layout 'nhwc'"):
        Runner(_model(), layout="nhwc")
