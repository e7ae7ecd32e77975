"""Deep nearest neighbours on the penultimate features (column ``knn``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from nrm.detectors.base import DetectorError, Head, Rows
from nrm.detectors.baseline import BaselineDetector, finite, matrix


def knn_distance(queries: Tensor, bank: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Euclidean distance from each L2-normalised query to its k-th nearest neighbour in ``bank``,
    whose rows must already be L2-normalised (Sun et al. 2022, "Out-of-Distribution Detection with Deep
    Nearest Neighbors", ICML):

        z = f / ||f||,   d_k(z) = || z - b_(k) ||,   ||z - b||^2 = 2 - 2 z.b   (unit vectors)

    queries (N, F), bank (M, F) -> d_k (N,), in the bank's dtype. The queries go ``chunk_size`` at a
    time, so the peak extra memory is about two chunk_size x M similarity matrices (the product and
    topk's work space), not N x M."""
    z = queries.to(bank.dtype)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(z.shape[0], dtype=bank.dtype, device=bank.device)
    for start in range(0, z.shape[0], chunk_size):
        sim = z[start:start + chunk_size] @ bank.T  # (chunk, M) cosine similarities
        kth = sim.topk(k, dim=1).values[:, -1]  # the k-th largest similarity = the k-th nearest neighbour
        out[start:start + chunk_size] = (2.0 - 2.0 * kth).clamp_min(0.0).sqrt()
    return out


@dataclass(eq=False)
class KNN(BaselineDetector):
    """Sun et al. (2022): the negated distance from the L2-normalised feature to its k-th nearest
    neighbour among the L2-normalised training features; higher = in-distribution.

    k = 50 is the paper's CIFAR-10 choice. OpenOOD and the paper's code report -(squared distance)
    from faiss; the square is monotone, so AUROC and FPR@95 are the same. Queries are scored
    ``chunk_size`` at a time (peak memory chunk_size x bank rows similarities). The bank keeps the
    features' dtype (float32 features: half the memory)."""

    bank: Tensor | None = None  # (M, F), rows of unit length
    k: int = 50
    chunk_size: int = 1024
    name: ClassVar[str] = "knn"
    keys: ClassVar[tuple[str, ...]] = ("bank",)

    def __post_init__(self) -> None:
        if self.k < 1 or self.chunk_size < 1:
            raise DetectorError(f"KNN needs k >= 1 and chunk_size >= 1, got k = {self.k}, chunk_size = {self.chunk_size}")
        if self.bank is not None:
            self._check_bank(self.bank)

    def _check_bank(self, bank: Tensor) -> None:
        if self.k > bank.shape[0]:
            raise DetectorError(f"KNN k = {self.k} exceeds the {bank.shape[0]} training features in the bank "
                                f"(shape {tuple(bank.shape)}); use k <= {bank.shape[0]} or more training data")

    def _fit(self, rows: dict[str, Tensor], head: Head, **options: Any) -> dict[str, Tensor]:
        f = finite(matrix(rows["penultimate"], "features"), "features")
        bank = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (M, F), unit rows
        self._check_bank(bank)
        return {"bank": bank}

    def score(self, cols: Rows) -> Tensor:
        """s (N,) float64 = -(distance to the k-th nearest training neighbour); higher = in-distribution."""
        bank = self.tensors()["bank"]
        f = matrix(cols["penultimate"], "features", bank.shape[1]).to(bank.device)
        return -knn_distance(f, bank, self.k, self.chunk_size).double()

    @staticmethod
    def _load(t: Any) -> Tensor:
        return torch.as_tensor(t).contiguous()  # the dtype it was fitted in
