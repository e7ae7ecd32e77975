"""How a run batches its rows: Ray Data's batch (fixed when the dataset is built) and the rows an actor
scores at once (``--batch-size N`` or ``auto``, and ``--memory-budget``).

Ray Data needs its batch size before any actor exists, and the memory a batch needs is known only on
the actor's device, so the two are decided in two places:

- the driver fixes Ray Data's batch: N rows for ``--batch-size N``; for ``auto``, as many rows as
  AUTO_BATCH_BYTES of decoded pixels hold (more on a GPU, which needs large batches to be busy, than
  on a CPU, where a smaller batch starts scoring sooner after the first decodes); Ray Data goes on
  scheduling the reads, the actors and their retries as for any batch size;
- each actor, at start-up, probes its own device (nrm.batching.probe_batch_size: two probe batches
  through the run's ScorePlan) and scores each Ray batch in pieces of the rows that fit its budget
  (nrm.batching.score_in_pieces), at most the Ray batch. Any piece that still runs out of memory is
  halved and retried, with a fixed batch size too; a row that alone does not fit is an error row.

Importing this module imports no torch and no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from nrm.plan import ScorePlan
    from nrm.runner import Runner

AUTO: Literal["auto"] = "auto"
FIXED_BATCH = 512  # rows per batch when the input is at most AUTO_ABOVE_PX: thumbnails fit any device at 512
AUTO_ABOVE_PX = 64  # --batch-size defaults to auto for inputs larger than this (height or width)
# Ray Data's batch under auto, in bytes of decoded uint8 pixels: 224 px RGB gives 440 rows on a GPU, 104 on a CPU
AUTO_BATCH_BYTES = {"gpu": 64 << 20, "cpu": 16 << 20}
MAX_AUTO_ROWS = 4096
# The default budget: this share of the memory available to the actor (a CUDA device's free memory; on a
# CPU the node's available RAM times the actor's share of the node's CPUs). A CPU node also holds the
# object store, the read tasks and the Python heaps, so the CPU default leaves half.
DEFAULT_FRACTION = {"cuda": 0.8, "cpu": 0.5}

BatchSize = int | Literal["auto"]


def parse_batch_size(text: str) -> BatchSize:
    """``auto`` or a whole number >= 1 of rows; else ValueError naming ``text`` and what was expected."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ValueError(f"{text!r} is not a batch size; expected a whole number of rows >= 1, or auto")
    return rows


@dataclass(frozen=True)
class Batching:
    """What each scoring actor is told: Ray Data's batch ``rows``, whether to probe (``auto``), the
    ``budget`` text (None: DEFAULT_FRACTION) and the actor's ``cpus`` and ``gpus``."""

    rows: int
    auto: bool = False
    budget: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0

    def rows_at_once(self, runner: Runner, plan: ScorePlan) -> int:
        """The rows this actor scores at once: ``rows``, or under auto the probe's pick for its budget
        (at most ``rows``)."""
        if not self.auto:
            return self.rows
        from nrm.batching import probe_batch_size

        shape = runner.model.input_shape
        return probe_batch_size(runner, plan, shape, self.budget_bytes(runner), cap=self.rows)

    def budget_bytes(self, runner: Runner) -> int:
        """The budget in bytes on this actor's device: ``budget`` as given (bytes, or a share of the
        memory available to the actor), else DEFAULT_FRACTION of that memory."""
        from nrm.batching import MemoryBudget, available_bytes

        device = runner.device
        share = min(1.0, self.gpus) if device.type == "cuda" and self.gpus > 0 else 1.0
        if device.type == "cpu":
            share = min(1.0, self.cpus / _node_cpus())
        available = int(available_bytes(device) * share)
        budget = MemoryBudget.parse(self.budget) if self.budget else MemoryBudget(fraction=DEFAULT_FRACTION[device.type])
        return budget.bytes_of(available)


def batching(batch_size: int | str | None, budget: str | None, input_shape: tuple[int, int, int], cpus: float,
             gpus: float) -> Batching:
    """The run's Batching for ``--batch-size`` (None: auto for inputs larger than AUTO_ABOVE_PX, else
    FIXED_BATCH) and ``--memory-budget``, for actors of ``cpus`` and ``gpus``."""
    c, h, w = input_shape
    if batch_size is None:
        batch_size = AUTO if max(h, w) > AUTO_ABOVE_PX else FIXED_BATCH
    if batch_size != AUTO:
        return Batching(int(batch_size), False, budget, cpus, gpus)
    rows = AUTO_BATCH_BYTES["gpu" if gpus > 0 else "cpu"] // (c * h * w)
    rows = max(8, min(MAX_AUTO_ROWS, rows - rows % 8))
    return Batching(rows, True, budget, cpus, gpus)


def check_budget(text: str) -> str:
    """``text`` if it is a memory budget (nrm.batching.MemoryBudget.parse); else its ValueError."""
    from nrm.batching import MemoryBudget

    MemoryBudget.parse(text)
    return text


def _node_cpus() -> float:
    """The CPUs Ray gives this actor's node (os.cpu_count() outside Ray)."""
    import os

    try:
        import ray

        node = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node and n.get("Resources", {}).get("CPU"):
                return float(n["Resources"]["CPU"])
    except Exception:  # not in a Ray worker, or the GCS cannot be asked: the machine's count
        pass
    return float(os.cpu_count() or 1)
