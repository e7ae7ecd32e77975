"""The Neural Rendering Model: a ReLU/max-pool CNN read both ways.

Bottom-up (``encode``) it is an ordinary classifier that also records its latent variables: the
ReLU gates s*(l) and the max-pool switches t*(l). Top-down (``render``) it draws an image from the
class template mu_y* through the transposed weights of the same layers, eq. (1) of the seed:

    h(l-1) = sum_p T(t*(l, p)) B(l, p) W(l)^T (s*(l, p) h(l, p))

``score`` turns both passes into the per-sample columns of nrm.scores. Two renderers exist:
``render_explicit`` follows eq. (1) literally (fold of per-position templates, scatter to the
switches); ``render`` takes one vector-Jacobian product, since for a piecewise-linear network
h(0) = d logit_y* / dx. Tests hold them equal in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nrm import detectors as D
from nrm import scores as S
from nrm.config import (
    Conv,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    Linear,
    MaxPool,
    ModelConfig,
    ReLU,
    validate,
)


@dataclass
class Latents:
    """What the bottom-up pass keeps; lists are indexed like ``config.layers``."""

    logits: Tensor  # (N, K)
    inputs: list[Tensor]  # input of every layer (N, C, H, W) or (N, F)
    gates: dict[int, Tensor]  # relu index -> s*(l): 1 where the unit fired, else 0 (or the leaky slope)
    switches: dict[int, Tensor]  # maxpool index -> t*(l): flat argmax positions (N, C, H', W')
    pre_activations: dict[int, Tensor]  # conv / hidden-linear index -> z = W a + b


@dataclass
class Rendering:
    """The top-down pass from class ``y``: h(0) and the per-layer latent prior terms eta_l."""

    y: Tensor  # (N,) class rendered from
    h0: Tensor  # (N, C, H, W) rendered image in normalised input space
    eta_layers: Tensor  # (N, L) b(l)^T (s(l) . h(l)) for each bias layer, bottom-up
    eta_channels: Tensor | None = None  # (N, sum_l C_l) the same per output channel c: b_c(l) sum_p (s . h)_{c,p}


class NRM(nn.Module):
    """A CNN built from ``ModelConfig.layers`` that is also its own generative renderer."""

    mean: Tensor  # (1, C, 1, 1) buffers: preprocessing and the fitted normaliser
    std: Tensor
    log_partition: Tensor  # (K,)

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate(config)
        D.column_names(config.fitted.detector)  # an unknown detector name fails here, not at the first score
        self.config = config
        self.params = nn.ModuleDict()
        for layer in config.layers:
            if isinstance(layer, Conv):
                self.params[layer.name] = nn.Conv2d(
                    layer.in_, layer.out, layer.kernel, layer.stride, layer.padding, bias=layer.bias
                )
            elif isinstance(layer, Linear):
                self.params[layer.name] = nn.Linear(layer.in_, layer.out)
        spec = config.input
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer(
            "log_partition", torch.tensor(config.fitted.log_partition or [0.0] * len(config.classes)),
            persistent=False,
        )
        # Layers whose bias is a latent prior parameter b(l): every conv and every linear but the classifier.
        self.bias_layers = [
            k for k, layer in enumerate(config.layers[:-1]) if isinstance(layer, Conv | Linear)
        ]

    # ------------------------------------------------------------------ preprocessing
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.config.input.shape

    @property
    def latent_names(self) -> list[str]:
        return [self.config.layers[k].name for k in self.bias_layers]  # type: ignore[union-attr]

    def layer(self, name: str) -> nn.Conv2d | nn.Linear:
        """The torch module holding weight and bias of conv or linear layer ``name``."""
        mod = self.params[name]
        assert isinstance(mod, nn.Conv2d | nn.Linear)
        return mod

    @property
    def extra_columns(self) -> list[str]:
        """Names of the fitted detector columns (``det_*``, higher = in-distribution) that score() adds."""
        return D.column_names(self.config.fitted.detector)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 pixels, (N, H, W) or (N, H, W, C), to normalised float (N, C, H, W) on the model's device."""
        c, h, w = self.input_shape
        if images.dim() == 3 and c == 1:
            images = images.unsqueeze(-1)
        if images.dim() != 4 or tuple(images.shape[1:]) != (h, w, c):
            raise ValueError(
                f"preprocess: got images of shape {tuple(images.shape)}, expected (N, {h}, {w}, {c})"
                + (f" or (N, {h}, {w})" if c == 1 else "")
            )
        if images.dtype != torch.uint8:
            raise ValueError(f"preprocess: got dtype {images.dtype}, expected torch.uint8 pixels")
        x = images.to(self.mean.device).permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0  # (N, C, H, W)
        return (x - self.mean) / self.std

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"got input of shape {tuple(x.shape)}, expected (N, {', '.join(map(str, self.input_shape))})")

    # ------------------------------------------------------------------ bottom-up
    def _run(self, x: Tensor, keep: bool) -> tuple[Tensor, Latents | None, list[Tensor]]:
        """The one bottom-up loop. Returns logits, the latents (when ``keep``) and the pre-activations
        of the bias layers (always: the autograd renderer differentiates with respect to them)."""
        lat = Latents(x, [], {}, {}, {}) if keep else None
        zs: list[Tensor] = []
        for k, layer in enumerate(self.config.layers):
            if lat is not None:
                lat.inputs.append(x)
            if isinstance(layer, Conv | Linear):
                x = self.params[layer.name](x)
                if k in self.bias_layers:
                    zs.append(x)
                    if lat is not None:
                        lat.pre_activations[k] = x
            elif isinstance(layer, ReLU):
                if lat is not None:
                    lat.gates[k] = (x > 0).to(x.dtype)
                x = F.relu(x)
            elif isinstance(layer, LeakyReLU):
                if lat is not None:
                    lat.gates[k] = torch.where(x > 0, x.new_tensor(1.0), x.new_tensor(layer.slope))
                x = F.leaky_relu(x, layer.slope)
            elif isinstance(layer, MaxPool):
                if lat is not None:
                    x, lat.switches[k] = F.max_pool2d(x, layer.kernel, layer.stride, return_indices=True)
                else:
                    x = F.max_pool2d(x, layer.kernel, layer.stride)
            elif isinstance(layer, GlobalAvgPool):
                x = x.mean(dim=(2, 3), keepdim=True)
            elif isinstance(layer, Flatten):
                x = x.flatten(1)
        if lat is not None:
            lat.logits = x
        return x, lat, zs

    def forward(self, x: Tensor) -> Tensor:
        """Plain classifier: normalised images (N, C, H, W) -> logits (N, K)."""
        return self._run(x, keep=False)[0]

    def encode(self, x: Tensor) -> Latents:
        """Bottom-up pass that keeps the latent variables z* = {s*(l), t*(l)}."""
        return self._run(x, keep=True)[1]  # type: ignore[return-value]

    # ------------------------------------------------------------------ top-down
    def render_explicit(self, lat: Latents, y: Tensor | None = None) -> Rendering:
        """Eq. (1) literally: start from h(L) = mu_y (classifier row) and walk the layers in reverse.

        conv: each position p of h(l) draws its template W^T h(l, p) (C_in*k*k values), and fold
        places it at p (B(l, p)) and sums overlaps; maxpool: each value goes to its switch t*(l)
        (scatter-add, so overlapping windows are exact); relu: multiply by the gate s*(l); global
        average pool: spread evenly; eta_l = sum over channels and positions of b(l) . h at that
        layer's output.
        """
        layers = self.config.layers
        if y is None:
            y = lat.logits.argmax(1)
        h = self.layer(layers[-1].name).weight[y]  # type: ignore[union-attr]  # (N, F) = mu_y
        eta: dict[int, Tensor] = {}  # per-channel terms (N, C_l); eta_l is their sum
        for k in range(len(layers) - 2, -1, -1):
            layer, a = layers[k], lat.inputs[k]
            if isinstance(layer, Linear):
                lin = self.layer(layer.name)
                eta[k] = h * lin.bias if lin.bias is not None else h.new_zeros(h.shape)  # (N, F)
                h = h @ lin.weight  # (N, F_in)
            elif isinstance(layer, Flatten):
                h = h.view(a.shape)
            elif isinstance(layer, GlobalAvgPool):
                h = h.expand(a.shape) / (a.shape[2] * a.shape[3])
            elif isinstance(layer, MaxPool):
                n, c = h.shape[:2]
                flat = torch.zeros(n, c, a.shape[2] * a.shape[3], dtype=h.dtype, device=h.device)
                h = flat.scatter_add(2, lat.switches[k].flatten(2), h.flatten(2)).view(a.shape)
            elif isinstance(layer, ReLU | LeakyReLU):
                h = h * lat.gates[k]
            elif isinstance(layer, Conv):
                conv = self.layer(layer.name)
                if conv.bias is not None:
                    eta[k] = h.sum(dim=(2, 3)) * conv.bias  # (N, C)
                else:
                    eta[k] = h.new_zeros(h.shape[:2])
                templates = torch.einsum("ncp,cq->nqp", h.flatten(2), conv.weight.flatten(1))  # (N, Cin*k*k, P)
                h = F.fold(
                    templates, a.shape[2:], layer.kernel, padding=layer.padding, stride=layer.stride
                )  # (N, Cin, H, W)
        per_channel = [eta[k] for k in self.bias_layers]
        return Rendering(y, h, torch.stack([e.sum(1) for e in per_channel], dim=1), torch.cat(per_channel, dim=1))

    def _vjp(self, x: Tensor, y: Tensor | None, create_graph: bool) -> tuple[Tensor, Rendering, list[Tensor]]:
        """One vector-Jacobian product of logit_y with respect to x and every bias layer's output.
        Returns the logits, the rendering and the bias layers' pre-activations z(l)."""
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits, _, zs = self._run(x, keep=False)
            if y is None:
                y = logits.detach().argmax(1)
            picked = logits.gather(1, y[:, None]).sum()
            grads = torch.autograd.grad(picked, [x, *zs], create_graph=create_graph)
        eta = []
        for k, g in zip(self.bias_layers, grads[1:], strict=True):
            bias = self.layer(self.config.layers[k].name).bias  # type: ignore[union-attr]
            per_unit = g.sum(dim=(2, 3)) if g.dim() == 4 else g  # (N, C)
            eta.append(per_unit * bias if bias is not None else torch.zeros_like(per_unit))  # (N, C)
        rendering = Rendering(y, grads[0], torch.stack([e.sum(1) for e in eta], dim=1), torch.cat(eta, dim=1))
        return logits, rendering, zs

    def render(self, x: Tensor, y: Tensor | None = None, create_graph: bool = False) -> Rendering:
        """Fast renderer: h(0) = d logit_y / dx and eta_l = b(l) . d logit_y / dz(l), in one backward
        pass. ``y`` defaults to y* = argmax; ``create_graph`` lets training differentiate through it."""
        return self._vjp(x, y, create_graph)[1]

    def unit_stats(self, zs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-channel statistics of the bottom-up pass, over spatial positions p, for every bias layer:

            gate rate  g_{l,c} = mean_p 1[z(l)_{c,p} > 0]       the ReLU latents s*(l), as on-rates
            act mean   a_{l,c} = mean_p max(z(l)_{c,p}, 0)      the positive part of the activation

        zs are the bias layers' pre-activations z(l), (N, C, H, W) or (N, F). Returns two (N, sum_l C_l)."""
        rates, means = [], []
        for z in zs:
            z = z.detach().flatten(2) if z.dim() == 4 else z.detach()[:, :, None]  # (N, C, P); P = 1 for linear
            rates.append(z.gt(0).sum(dim=2, dtype=z.dtype) / z.shape[2])  # (N, C)
            means.append(z.clamp_min(0).sum(dim=2) / z.shape[2])  # (N, C)
        return torch.cat(rates, dim=1), torch.cat(means, dim=1)

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def score(self, x: Tensor, unit_stats: bool | None = None) -> dict[str, Tensor]:
        """Every per-sample column of the public contract (nrm.scores.COLUMNS), then ``extra_columns``, for normalised x.
        ``unit_stats`` adds ``latent_gates`` / ``unit_acts`` (see :meth:`unit_stats`); by default only
        when the fitted detector reads them (they cost a pass over every activation)."""
        self.check_input(x)
        logits, r, zs = self._vjp(x, None, create_graph=False)
        logits = logits.detach()
        fitted = self.config.fitted
        out = S.classifier_scores(logits)
        out["latent_prior_layers"] = r.eta_layers.detach()
        out["latent_prior"] = S.latent_prior(r.eta_layers.detach())
        out["latent_loglik"] = S.latent_loglik(out["latent_prior"], r.y, self.log_partition)
        out["recon_sq_error"] = S.recon_sq_error(x.detach(), r.h0.detach())
        out["loglik_bound"] = S.loglik_bound(out["recon_sq_error"], out["latent_loglik"], fitted.sigma2)
        # Not a public column: eta_l split by output channel, one input of the detectors (nrm.detectors).
        out["latent_prior_channels"] = r.eta_channels.detach()  # type: ignore[union-attr]
        if unit_stats or (unit_stats is None and D.needs_unit_stats(fitted.detector)):
            out["latent_gates"], out["unit_acts"] = self.unit_stats(zs)  # also detector inputs only
        out.update(D.score_columns(fitted.detector, out))  # det_<name> (nrm.detectors), if one is fitted
        return out

    def extra_repr(self) -> str:
        return f"input={self.input_shape}, classes={len(self.config.classes)}, latent_layers={self.latent_names}"
