"""How many rows to score at once: a batch size that fits a memory budget, and scoring that survives
running out of memory.

    budget = MemoryBudget.parse("80%").bytes_of(available_bytes(runner.device))
    rows = probe_batch_size(runner, plan, model.input_shape, budget)   # measured on probe batches of 8 and 16
    scored = score_in_pieces(runner, x, plan, rows)                     # halves a piece that runs out of memory

The probe measures the peak memory one scoring call allocates beyond what was allocated before it (the
input, the passes' activations, autograd's saved tensors and the columns): on CUDA the caching
allocator's peak (``torch.cuda.max_memory_allocated``); on a CPU the profiler's record of every
allocation and free of torch's CPU allocator, replayed in order. Both count tensor bytes, exact and
unaffected by other processes or by the allocator keeping freed pages (jobs/allocator.py), which make
a process's resident size useless for this. Memory grows linearly in the rows scored at once (every
activation has a batch dimension), so two probes give the fixed and the per-row bytes; where small
batches fall off that line, the fit errs towards fewer rows (:func:`fit_batch_size`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nrm.plan import ScorePlan

if TYPE_CHECKING:
    from nrm.runner import Runner

PROBE_ROWS = (8, 16)  # two probe batches: small enough for any device, far enough apart to fit a line
MULTIPLE = 8  # a chosen batch of 8 rows or more is rounded down to a multiple of 8
MAX_BATCH = 4096  # the default cap: a budget far above the need never makes batches of tens of thousands
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNIT_NAMES = ("B", "kB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")
_BUDGET = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*|%)\s*", re.IGNORECASE)


class MemoryBudgetError(ValueError):
    """A memory budget that cannot be read; the message names the value and what was expected."""


@dataclass(frozen=True)
class MemoryBudget:
    """A budget in bytes (``size``) or as a fraction of the memory available (``fraction``): one is set."""

    size: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> MemoryBudget:
        """"6GiB", "512 MB", "1.5GB" (bytes: B, kB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in
        powers of 1024) or "80%" (of the memory available, above 0 and at most 100)."""
        m = _BUDGET.fullmatch(text)
        unit = m.group(2).lower() if m else ""
        if m is None or (unit != "%" and unit not in UNITS):
            raise MemoryBudgetError(f"{text!r} is not a memory budget; expected a size with a unit, such as 6GiB "
                                    f"or 512MB (units {', '.join(_UNIT_NAMES)}), or a percentage such as 80%")
        value = float(m.group(1))
        if unit == "%":
            if not 0 < value <= 100:
                raise MemoryBudgetError(f"{text!r} is not a memory budget; expected a percentage above 0% and at "
                                        "most 100% of the memory available")
            return cls(fraction=value / 100)
        size = int(value * UNITS[unit])
        if size < 1:
            raise MemoryBudgetError(f"{text!r} is not a memory budget; expected at least one byte, such as 6GiB")
        return cls(size=size)

    def bytes_of(self, available: int) -> int:
        """The budget in bytes, given the bytes ``available`` that a fraction is taken of."""
        return self.size if self.size is not None else int(available * (self.fraction or 0.0))


def available_bytes(device: torch.device) -> int:
    """The memory a new allocation can take now: free memory of a CUDA device; on a CPU the smaller of
    the system's available memory (/proc/meminfo) and what its cgroup limit leaves."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = _meminfo_available()
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        free = min(free, max(0, limit - used))
    return free


# ---------------------------------------------------------------------------- the probe
def probe_batch_size(runner: Runner, plan: ScorePlan, input_shape: tuple[int, int, int], budget_bytes: int,
                     cap: int = MAX_BATCH) -> int:
    """The largest batch whose scoring (``runner.score(x, plan)``) fits ``budget_bytes``, from the peak
    memory of probe batches of 8 and 16 rows fitted as a line, peak(n) = fixed + n * per_row
    (:func:`fit_batch_size`):

        rows = (budget - fixed) // per_row, rounded down to a multiple of 8 when >= 8, in [1, cap]

    One row is the floor: a budget too small for it, or a probe that runs out of memory, leaves the
    rows to :func:`score_in_pieces`."""
    try:
        small, large = (peak_bytes(runner, plan, input_shape, n) for n in PROBE_ROWS)
    except Exception as e:
        if not out_of_memory(e):
            raise
        return 1
    return fit_batch_size({PROBE_ROWS[0]: small, PROBE_ROWS[1]: large}, budget_bytes, cap)


def fit_batch_size(peaks: dict[int, int], budget_bytes: int, cap: int = MAX_BATCH) -> int:
    """The batch :func:`probe_batch_size` picks from measured ``peaks`` (rows -> peak bytes, two entries):
    the most rows that both the line through the two probes and the larger probe's bytes per row
    (peak(n) = n * peak(n1) / n1) keep within the budget. The second guards against small batches whose
    peak lies above the line of large ones (a line fitted to them then grows too slowly), and against
    a line that does not grow."""
    (n0, p0), (n1, p1) = sorted(peaks.items())
    slope = (p1 - p0) / (n1 - n0)
    rows = budget_bytes * n1 // max(p1, 1)
    if slope > 0:
        rows = min(rows, int((budget_bytes - (p1 - n1 * slope)) // slope))
    if rows >= MULTIPLE:
        rows -= rows % MULTIPLE
    return max(1, min(rows, cap))


def peak_bytes(runner: Runner, plan: ScorePlan, input_shape: tuple[int, int, int], rows: int) -> int:
    """Peak bytes that scoring ``rows`` rows of ``input_shape`` allocates beyond what was allocated before
    (its input included), measured on the runner's device (see the module's docstring)."""
    device = runner.device

    def run() -> None:
        runner.score(torch.randn((rows, *input_shape), generator=torch.Generator().manual_seed(0)).to(device), plan)

    return peak_bytes_of(run, device)


def peak_bytes_of(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes live during ``fn()`` among those it allocated on ``device``: CUDA's allocator peak over
    what was allocated before; on a CPU the profiler's memory records (+bytes per allocation, -bytes per
    free) summed in time order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------- scoring in pieces
@dataclass
class Scored:
    """What :func:`score_in_pieces` scored: ``cols`` (the plan's outputs, on the CPU) for the rows of x
    where ``scored`` (N,) is True, in their order; ``error`` says why the others were not scored."""

    cols: dict[str, Tensor]
    scored: Tensor
    error: str | None = None


def score_in_pieces(runner: Runner, x: Tensor, plan: ScorePlan, rows: int | None = None,
                    prepare: Callable[[Tensor], Tensor] | None = None) -> Scored:
    """``runner.score`` of x in pieces of ``rows`` (None: all at once), each piece made model input by
    ``prepare`` (e.g. ``NRM.preprocess`` of uint8 pixels; None: x is model input), so that only one
    piece is ever converted. A piece that runs out of memory is split in halves and each retried,
    down to one row; a row that alone runs out of memory is left unscored, with the error. Other
    errors propagate."""
    done: list[tuple[int, dict[str, Tensor]]] = []  # (first row, its piece's columns)
    failed: list[int] = []
    error = None
    step = rows or max(1, len(x))
    for start in range(0, len(x), step):
        for first, cols, err in _score_halving(runner, x, plan, prepare, start, min(start + step, len(x))):
            if cols is None:
                failed.append(first)
                error = err
            else:
                done.append((first, cols))
    scored = torch.ones(len(x), dtype=torch.bool)
    scored[failed] = False
    return Scored(_concat([c for _, c in sorted(done, key=lambda d: d[0])], plan), scored, error)


def _score_halving(runner: Runner, x: Tensor, plan: ScorePlan, prepare: Callable[[Tensor], Tensor] | None,
                   lo: int, hi: int) -> Iterator[tuple[int, dict[str, Tensor] | None, str | None]]:
    """(first row, columns on the CPU or None, error) of rows lo:hi, halving the piece on each OOM."""
    try:
        piece = x[lo:hi] if prepare is None else prepare(x[lo:hi])
        yield lo, {k: v.cpu() for k, v in runner.score(piece, plan).items()}, None
        return
    except Exception as e:
        if not out_of_memory(e):
            raise
        err = f"out of memory scoring {'one row' if hi - lo == 1 else f'{hi - lo} rows'}: {_first_line(e)}"
    if runner.device.type == "cuda":  # hand the failed piece's cached blocks back before retrying
        torch.cuda.empty_cache()
    if hi - lo == 1:
        yield lo, None, err
        return
    mid = (lo + hi) // 2
    yield from _score_halving(runner, x, plan, prepare, lo, mid)
    yield from _score_halving(runner, x, plan, prepare, mid, hi)


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def _concat(pieces: list[dict[str, Tensor]], plan: ScorePlan) -> dict[str, Tensor]:
    if not pieces:
        return {}
    return {k: torch.cat([p[k] for p in pieces]) for k in plan.outputs}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # no /proc: all of it


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit
