"""BatchNorm put back for training, folded away after it (Ioffe & Szegedy 2015).

The NRM is the folded network: a converted ResNet's BatchNorms live inside its convolutions'
weights and biases (nrm.convert), so fine-tuning it trains plain convolutions, at step sizes no
BatchNorm keeps in range any more (SGD at the ResNet recipe's rates diverged; docs/results.md 5).
:class:`TrainNorm` gives every bias node l (conv or linear, weight W, bias b) its BatchNorm back
for the length of training:

    z(l) = gamma (W a - m_B) / sqrt(v_B + eps) + beta        m_B, v_B: the batch's per-channel mean, variance

started so that z(l) = W a + b on a calibration batch (gamma = sqrt(v + eps), beta = m + b, with m and
v that batch's statistics), and folded back into W and b with population statistics at the end:

    W <- W gamma / sqrt(v_pop + eps)        b <- beta - gamma m_pop / sqrt(v_pop + eps)

so what training returns is again a network of the NRM's own ops, with the same graph. The population
statistics are measured on un-augmented images (:meth:`TrainNorm.measure`: "precise BatchNorm",
Wu & Johnson 2021), the distribution the network will score, not a running average over augmented
batches of weights that kept changing. The BatchNorm's bias b itself is not trained (beta is).
On the converted ResNet-20 it let SGD train at 2e-2 and 5e-2 without diverging, but did not raise
the test accuracy (docs/results.md section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5


def _channel_moments(u: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dim 1) mean and biased variance of a (N, C, ...) tensor, over every other dim."""
    dims = [d for d in range(u.dim()) if d != 1]
    var, mean = torch.var_mean(u, dim=dims, unbiased=False)
    return mean, var


class TrainNorm(nn.Module):
    """One BatchNorm per bias node, keyed by node name; ``norm(name, W a)`` normalises a node's
    unbiased output. nrm.training attaches it to the model (``NRM.train_norm``), runs one forward with
    ``calibrating`` set, trains, measures the population statistics and calls :meth:`fold`."""

    def __init__(self, biases: dict[str, Tensor]):
        super().__init__()
        self.names = list(biases)
        self._slot = {n: str(k) for k, n in enumerate(self.names)}
        self.gamma = nn.ParameterDict({s: nn.Parameter(torch.ones_like(biases[n])) for n, s in self._slot.items()})
        self.beta = nn.ParameterDict({s: nn.Parameter(biases[n].detach().clone()) for n, s in self._slot.items()})
        for n, s in self._slot.items():
            self.register_buffer(f"mean_{s}", torch.zeros_like(biases[n]))
            self.register_buffer(f"var_{s}", torch.ones_like(biases[n]))
        self.calibrating = False  # the next forward sets gamma, beta and the statistics from its batch
        self.momentum = 0.1  # weight of each training batch in the stored statistics

    def __contains__(self, name: str) -> bool:
        return name in self._slot

    def forward(self, name: str, u: Tensor) -> Tensor:
        """u = W a (N, C, ...) -> the normalised, scaled and shifted z(l), same shape."""
        s = self._slot[name]
        mean, var = getattr(self, f"mean_{s}"), getattr(self, f"var_{s}")
        gamma, beta = self.gamma[s], self.beta[s]
        if self.calibrating:  # identity on this batch: z = u + b
            with torch.no_grad():
                m, v = _channel_moments(u)
                mean.copy_(m)
                var.copy_(v)
                gamma.copy_((v + EPS).sqrt())
                beta.add_(m)
            return F.batch_norm(u, mean, var, gamma, beta, False, 0.0, EPS)
        return F.batch_norm(u, mean, var, gamma, beta, self.training, self.momentum, EPS)

    @torch.no_grad()
    def fold(self, params: dict[str, dict[str, Tensor]]) -> None:
        """Fold every BatchNorm into its node's ``weight`` and ``bias`` (in place), from the stored
        statistics: W <- W s, b <- beta - s m with s = gamma / sqrt(v + eps)."""
        for name, s in self._slot.items():
            p = params[name]
            mean, var = getattr(self, f"mean_{s}"), getattr(self, f"var_{s}")
            scale = self.gamma[s] / (var + EPS).sqrt()  # (C,)
            p["weight"].mul_(scale.view(-1, *([1] * (p["weight"].dim() - 1))))
            p["bias"].copy_(self.beta[s] - scale * mean)
