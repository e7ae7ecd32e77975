"""Figures and HTML for `nrm-ood evaluate` and `nrm-ood report`: PNG bytes in, one static page out.

Plots use matplotlib's object API (``Figure`` + the Agg canvas): no pyplot state, no display, safe in
any process. Every figure function returns PNG bytes; the caller decides whether they go to a file
beside the page (``evaluate``) or into the page as a ``data:`` URI (``report``). Pages carry no
external JS or CSS; one inline script marks ``<body data-images-loaded>`` once every ``<img>`` has
decoded, which is what the browser test checks.

Renderings: ``render_pairs`` re-reads scored rows by (source_path, source_row), decodes them at the
model's shape as the job did, and draws h(0) = ``model.render(x).h0`` de-normalised with the
model's mean/std and min-max scaled per image, so a person sees what the model "expected".
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jobs.images import Policy, decode_column, detect_columns
from jobs.storage import Store
from nrm import metrics

DPI = 100


# ---------------------------------------------------------------------------- PNG plumbing
def to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------- plots
TAIL = 0.01  # a histogram's axis spans the 1st-99th percentiles when a heavy tail would squeeze the bulk
DECADES = 1.5  # a one-signed range wider than this many powers of ten is drawn on a symmetric-log axis


@dataclass(frozen=True)
class View:
    """A histogram's x-axis: its range and, for magnitudes over many decades, symlog's linear threshold."""

    lo: float
    hi: float
    linthresh: float | None = None  # None: a linear axis

    def bins(self, n: int) -> np.ndarray:
        """``n`` bins of equal width on the axis as drawn (log-spaced in magnitude on a symlog axis)."""
        if self.linthresh is None:
            return np.linspace(self.lo, self.hi, n + 1)
        c = self.linthresh
        ulo, uhi = (float(np.sign(v) * np.log10(1 + abs(v) / c)) for v in (self.lo, self.hi))
        u = np.linspace(ulo, uhi, n + 1)
        return np.sign(u) * c * (10 ** np.abs(u) - 1)


def view(pooled: np.ndarray, threshold: float | None = None) -> View:
    """The x-axis of a histogram of ``pooled``, so that the bulk and ``threshold`` are both visible.

    The range is the data's, or its 1st-99th percentiles when those span under a fifth of it (a heavy
    tail: 0 to 100,000 with the bulk and the threshold near 500); always widened to ``threshold``. When
    the values have one sign and their magnitudes still span more than ``DECADES`` powers of ten (a
    Mahalanobis distance: -2e6 in-distribution, -8e7 far out), the axis is symmetric-log."""
    lo, hi = float(pooled.min()), float(pooled.max())
    qlo, qhi = (float(q) for q in np.quantile(pooled, [TAIL, 1 - TAIL]))
    if qhi - qlo < 0.2 * (hi - lo):
        lo, hi = qlo, qhi
    if threshold is not None and np.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    small, large = sorted((abs(lo), abs(hi)))
    if lo * hi > 0 and large > small * 10**DECADES:
        return View(lo, hi, small)
    pad = 0.02 * (hi - lo) or 0.5
    return View(lo - pad, hi + pad)


def histogram(title: str, xlabel: str, series: dict[str, np.ndarray], threshold: float | None = None,
              note: str = "") -> bytes:
    """Overlaid step histograms (shared bins, each series' fraction of rows per bin) of each named series;
    a dashed line at ``threshold``. The axis is ``view``'s; values beyond it are drawn in the end bins
    and counted in the title."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    pooled = np.concatenate([v for v in series.values() if v.size] or [np.zeros(1)])
    axis = view(pooled, threshold)
    bins = axis.bins(min(60, max(10, int(np.sqrt(pooled.size)))))
    for name, v in series.items():
        if v.size:
            ax.hist(np.clip(v, axis.lo, axis.hi), bins=bins.tolist(), weights=np.full(v.size, 1.0 / v.size),
                    histtype="step", linewidth=1.5, label=f"{name} (n={v.size})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
    outside = int(np.sum((pooled < axis.lo) | (pooled > axis.hi)))
    if outside:
        note = "; ".join(filter(None, [note, f"{outside} of {pooled.size} values beyond the axis, drawn in the end bins"]))
    if axis.linthresh is not None:
        ax.set_xscale("symlog", linthresh=axis.linthresh)
        xlabel += " (symmetric log scale)"
    ax.set_xlim(axis.lo, axis.hi)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of the set per bin")
    ax.legend(fontsize=8)
    return to_png(fig)


def roc(title: str, curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> bytes:
    """ROC curves: name -> (oriented in-distribution scores, oriented OOD scores, AUROC)."""
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot()
    for name, (s_in, s_out, auc) in curves.items():
        fpr, tpr = metrics._roc(s_in, s_out)  # the ROC points nrm.metrics integrates: one builder
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.95, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("FPR: fraction of OOD accepted")
    ax.set_ylabel("TPR: fraction of in-distribution kept")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right", title="score (AUROC)", title_fontsize=7)
    return to_png(fig)


def bars(title: str, groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str = "AUROC",
         reference: float | None = 0.5) -> bytes:
    """Grouped bar chart: one group per entry of ``groups``, one bar per series (None draws nothing)."""
    fig = Figure(figsize=(max(4.8, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if a is None else a for a in vals], dtype=float)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=name)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x, list(groups), rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return to_png(fig)


def gallery(title: str, images: np.ndarray, renders: np.ndarray | None, captions: Sequence[str]) -> bytes:
    """One column per sample: the image on top and, when given, its rendering h(0) below it.

    images: (n, H, W, C) uint8; renders: (n, H, W, C) floats in [0, 1]."""
    n = max(1, len(images))
    rows = 1 if renders is None else 2
    fig = Figure(figsize=(max(3.0, 1.25 * n), 1.45 * rows + 0.5))
    axes = fig.subplots(rows, n, squeeze=False)
    for j in range(n):
        for r in range(rows):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images):
                ax.axis("off")
                continue
            if r == 0:
                _show(ax, images[j].astype(np.float64) / 255.0)
                ax.set_title(captions[j], fontsize=7)
            else:
                _show(ax, renders[j])  # type: ignore[index]
        if j == 0:
            axes[0, 0].set_ylabel("image", fontsize=8)
            if rows == 2:
                axes[1, 0].set_ylabel("rendering h0", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return to_png(fig)


def caption(row: dict[str, Any], classes: Sequence[str] | None, error: str | None = None) -> str:
    """A gallery caption: ood_score, the predicted class and, when the row has one, the true label."""
    def name(c: Any) -> str:
        return str(classes[c]) if classes and isinstance(c, int) and 0 <= c < len(classes) else str(c)

    lines = [f"{row['ood_score']:.3g}" + ("" if error is None else " (unreadable)"), f"pred {name(row.get('pred'))}"]
    if row.get("label") is not None:
        lines.append(f"label {name(row['label'])}")
    return "\n".join(lines)


def _show(ax: Any, img: np.ndarray) -> None:
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(img, 0.0, 1.0), interpolation="nearest")


# ---------------------------------------------------------------------------- images and renderings
def read_pixels(store: Store, refs: Sequence[tuple[str, int]], shape: tuple[int, int, int],
                image_column: str | None = None, policy: Policy = Policy.adapt
                ) -> tuple[np.ndarray, list[str | None]]:
    """Decode the rows ``refs`` = [(source_path, source_row)] at ``shape`` = (C, H, W), reading only
    the row groups that hold them. Returns (n, H, W, C) uint8 (zeros where it failed) and per-row errors."""
    c, h, w = shape
    out = np.zeros((len(refs), h, w, c), dtype=np.uint8)
    errors: list[str | None] = [None] * len(refs)
    by_path: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(refs):
        by_path.setdefault(path, []).append(i)
    for uri, idx in by_path.items():
        fs, path = store.filesystem(uri)
        try:
            with fs.open_input_file(path) as fh:
                pf = pq.ParquetFile(fh)
                cols = detect_columns(pf.schema_arrow, image_column)
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                cache: dict[int, Any] = {}
                for i in idx:
                    row = int(refs[i][1])
                    rg = int(np.searchsorted(starts, row, side="right")) - 1
                    if not 0 <= row < starts[-1]:
                        errors[i] = f"row {row} is outside {uri} ({starts[-1]} rows)"
                        continue
                    if rg not in cache:
                        cache[rg] = pf.read_row_group(rg, columns=[cols.image]).column(0)
                    px, err = decode_column(cache[rg].slice(row - int(starts[rg]), 1), cols.kind, shape, policy)
                    out[i], errors[i] = px[0], err[0]
        except Exception as e:  # missing, moved or unreadable file: those rows get no picture
            for i in idx:
                errors[i] = f"cannot re-read {uri}: {type(e).__name__}: {e}"
    return out, errors


def renderings(model: Any, pixels: np.ndarray) -> np.ndarray:
    """h(0) for uint8 pixels (n, H, W, C), for display: de-normalised with the model's mean/std, then
    min-max scaled per image to [0, 1] (a flat rendering becomes 0.5). Returns (n, H, W, C) float64."""
    import torch

    if len(pixels) == 0:
        return np.zeros(pixels.shape, dtype=np.float64)
    x = model.preprocess(torch.from_numpy(np.ascontiguousarray(pixels)))
    h0 = model.render(x).h0.detach()  # (n, C, H, W), normalised input space
    v = (h0 * model.std + model.mean).double()
    lo, hi = v.amin(dim=(1, 2, 3), keepdim=True), v.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    v = torch.where(span > 0, (v - lo) / span.clamp_min(1e-300), torch.full_like(v, 0.5))
    return v.permute(0, 2, 3, 1).cpu().numpy()


def read_options(run_manifest: dict[str, Any]) -> tuple[Policy, str | None]:
    """(resize policy, image column) a committed run was decoded with, so rows are re-read the same way."""
    o = run_manifest.get("options", {})
    try:
        policy = Policy(o.get("resize_policy", "adapt"))
    except ValueError:
        policy = Policy.adapt
    return policy, o.get("image_column")


def render_pairs(store: Store, model: Any, refs: Sequence[tuple[str, int]], image_column: str | None = None,
                 policy: Policy = Policy.adapt) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(images uint8, renderings in [0, 1], per-row errors) for the rows ``refs``; failed rows are blank."""
    pixels, errors = read_pixels(store, refs, model.input_shape, image_column, policy)
    ok = np.array([e is None for e in errors], dtype=bool)
    renders = np.zeros(pixels.shape, dtype=np.float64)
    if ok.any():
        renders[ok] = renderings(model, pixels[ok])
    return pixels, renders, errors


# ---------------------------------------------------------------------------- HTML
# Sets <body data-images-loaded="true|false" data-images-total=N data-images-broken=M> once the page has
# loaded: true when every <img> decoded (complete and naturalWidth > 0). Harmless in a normal browser.
_CHECK_IMAGES = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.dataset.imagesTotal = String(imgs.length);
  document.body.dataset.imagesBroken = String(broken.length);
  document.body.dataset.imagesLoaded = broken.length === 0 ? "true" : "false";
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; margin: 0.3em; vertical-align: top; }
.note { color: #555; font-size: 0.9em; }
</style>"""


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if np.isfinite(v) else str(v)
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img(src: str, alt: str) -> str:
    return f'<img src="{esc(src)}" alt="{esc(alt)}">'


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"{_STYLE}</head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n{_CHECK_IMAGES}\n</body></html>\n")
