"""Figures of what DC-DiT does: boundary-probability maps across sampling timesteps, kept fraction vs timestep,
and sample grids. Figures are built on matplotlib's object API with the Agg canvas (no pyplot, so no global
figure state); `RoutingRecorder` collects the routing of every model call during sampling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def to_uint8_nhwc(images: ArrayLike) -> np.ndarray:
    """Images as (N, H, W, C) uint8: uint8 input is taken as NHWC, float input as NCHW in [-1, 1]."""
    arr = _numpy(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, C) uint8 or (N, C, H, W) float, got {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr
    else:
        out = np.clip((arr.astype(np.float64) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if out.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images have {out.shape[-1]} channels; expected 1, 3 or 4 (uint8 images are NHWC, "
                         f"float images NCHW)")
    return out


def _probability_grids(probs_over_time: ArrayLike, grid_size: tuple[int, int] | None) -> np.ndarray:
    """(S, B, H, W) float array from an (S, B, H, W) / (S, B, L) array or a list of (B, L), (B, H, W) or Routing."""
    if isinstance(probs_over_time, (list, tuple)):
        steps = []
        for item in probs_over_time:
            if hasattr(item, "probs") and hasattr(item, "grid_size"):  # a Routing
                grid_size = grid_size or tuple(item.grid_size)
                item = item.probs
            steps.append(_numpy(item))
        arr = np.stack(steps)
    else:
        arr = _numpy(probs_over_time)
    if arr.ndim == 3:  # (S, B, L)
        s, b, length = arr.shape
        h, w = grid_size or (math.isqrt(length), math.isqrt(length))
        if h * w != length:
            raise ValueError(f"cannot lay {length} tokens on a square grid; pass grid_size=(H, W)")
        arr = arr.reshape(s, b, h, w)
    if arr.ndim != 4:
        raise ValueError(f"boundary probabilities must be (S, B, H, W) or (S, B, L), got shape {arr.shape}")
    return arr.astype(np.float32)


def boundary_maps(probs_over_time: ArrayLike, timesteps: Sequence[int], path: str | os.PathLike,
                  images: ArrayLike | None = None, *, grid_size: tuple[int, int] | None = None,
                  labels: Sequence[str] | None = None, panel_pixels: int = 128, alpha: float = 0.6) -> Path:
    """A PNG grid of boundary probabilities: one row per sample, one column per sampling timestep.

    `probs_over_time` is (S, B, H, W) (or (S, B, L), or a list of S Routing objects / (B, L) tensors, as
    `RoutingRecorder` collects them). With `images` ((B, ...) uint8 NHWC or float NCHW in [-1, 1], e.g. the
    decoded samples) each map is blended over its image with opacity `alpha`. Each panel notes its kept
    fraction (p > 0.5). Panels are composed as one picture, so large grids stay fast to draw.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    probs = _probability_grids(probs_over_time, grid_size)
    steps, batch, height, width = probs.shape
    timesteps = [int(t) for t in _numpy(timesteps).reshape(-1)]
    if len(timesteps) != steps:
        raise ValueError(f"got {len(timesteps)} timesteps for {steps} maps")
    pictures = to_uint8_nhwc(images) if images is not None else None
    if pictures is not None and len(pictures) != batch:
        raise ValueError(f"got {len(pictures)} images for {batch} samples")

    # Each map is upsampled by an integer factor (tokens stay crisp squares), images resized to the same panel.
    scale = max(1, panel_pixels // max(height, width))
    ph, pw, gap = height * scale, width * scale, max(2, scale // 2)
    cmap = colormaps["magma"]
    underlays = None if pictures is None else [_resize(picture, ph, pw) for picture in pictures]
    mosaic = np.ones((batch * ph + (batch - 1) * gap, steps * pw + (steps - 1) * gap, 3))
    for b in range(batch):
        for s in range(steps):
            panel = cmap(np.clip(probs[s, b], 0.0, 1.0))[..., :3].repeat(scale, 0).repeat(scale, 1)
            if underlays is not None:
                panel = alpha * panel + (1 - alpha) * underlays[b]
            top, left = b * (ph + gap), s * (pw + gap)
            mosaic[top:top + ph, left:left + pw] = panel

    margin_l, margin_r, margin_t, margin_b = 0.45, 1.0, 0.55, 0.25  # inches
    px_inch = 100.0
    row_text = 0.16  # inches of kept-fraction text under every row
    fig_w = mosaic.shape[1] / px_inch + margin_l + margin_r
    fig_h = mosaic.shape[0] / px_inch + margin_t + margin_b + row_text * batch
    fig = _figure(fig_w, fig_h)
    ax = fig.add_axes((margin_l / fig_w, margin_b / fig_h, mosaic.shape[1] / px_inch / fig_w,
                       (mosaic.shape[0] / px_inch + row_text * batch) / fig_h))
    # Each row is drawn as its own band so that a line of text fits under it.
    ax.set_xlim(0, mosaic.shape[1])
    ax.set_ylim(mosaic.shape[0] + row_text * batch * px_inch, 0)
    ax.axis("off")
    offset = 0.0
    for b in range(batch):
        top = b * (ph + gap)
        band = mosaic[top:top + ph]
        y0 = top + offset
        ax.imshow(band, extent=(0, mosaic.shape[1], y0 + ph, y0), interpolation="nearest", aspect="auto")
        for s in range(steps):
            cx = s * (pw + gap) + pw / 2
            kept = 100 * float((probs[s, b] > 0.5).mean())
            ax.text(cx, y0 + ph + 2, f"{kept:.0f}% kept", ha="center", va="top", fontsize=7)
            if b == 0:
                ax.text(cx, y0 - 4, f"t={timesteps[s]}", ha="center", va="bottom", fontsize=8)
        if labels is not None:
            ax.text(-6, y0 + ph / 2, str(labels[b]), ha="right", va="center", rotation=90, fontsize=8)
        offset += row_text * px_inch
    cax = fig.add_axes((1 - (margin_r - 0.25) / fig_w, 0.15, 0.15 / fig_w, 0.7))
    colorbar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), cax=cax)
    colorbar.set_label("boundary probability p", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    fig.suptitle("router boundary maps over sampling (noisy -> clean)", fontsize=9, y=1 - 0.08 / fig_h)
    return _save(fig, path)


def _resize(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, C) uint8 -> (height, width, 3) float in [0, 1], bilinear."""
    from PIL import Image

    rgb = picture[..., :3] if picture.shape[-1] >= 3 else np.repeat(picture, 3, axis=-1)
    resized = Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float64) / 255.0


def kept_fraction_curve(timesteps: Sequence[int], kept_fraction: ArrayLike, path: str | os.PathLike, *,
                        target: float | None = None, label: str = "DC-DiT") -> Path:
    """A PNG of the kept token fraction against the sampling timestep (time runs left to right: noisy -> clean).

    `kept_fraction` is (S,) or (S, B); per-sample values are drawn as their mean with a min-max band.
    `target` (1/N) draws the compression the ratio loss aims at.
    """
    t = _numpy(timesteps).reshape(-1).astype(np.float64)
    kept = np.atleast_1d(_numpy(kept_fraction).astype(np.float64))
    kept = kept[:, None] if kept.ndim == 1 else kept
    if kept.ndim != 2 or kept.shape[0] != len(t):
        raise ValueError(f"kept_fraction must be (S,) or (S, B) for S={len(t)} timesteps, got {kept.shape}")
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    mean = kept.mean(1)
    ax.plot(t, mean, marker="o", markersize=3, label=label)
    if kept.shape[1] > 1:
        ax.fill_between(t, kept.min(1), kept.max(1), alpha=0.25, label="min-max over samples")
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target 1/N = {target:.3g}")
    ax.invert_xaxis()  # noisy (large t) on the left, in the order sampling visits them
    ax.set_xlabel("diffusion timestep t (noisy -> clean)")
    ax.set_ylabel("kept fraction of tokens")
    ax.set_ylim(0.0, max(1e-3, min(1.0, float(kept.max()) * 1.15)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def sample_grid(images: ArrayLike, path: str | os.PathLike, nrow: int = 8, *, padding: int = 2,
                pad_value: int = 255) -> Path:
    """A pixel-exact PNG grid of `images` ((N, H, W, C) uint8 or (N, C, H, W) float in [-1, 1]), `nrow` per row."""
    from PIL import Image

    pictures = to_uint8_nhwc(images)
    n, h, w, c = pictures.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding, c), pad_value, np.uint8)
    for i, picture in enumerate(pictures):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        canvas[top:top + h, left:left + w] = picture
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode=mode).save(path, format="PNG")
    return path


class RoutingRecorder:
    """A sampling model_fn that calls `model(x, t, y, return_routing=True)` and records every call's routing.

    Use in place of the model: `rec = RoutingRecorder(model); ddim_sample(diffusion, rec, ...)`, then
    `boundary_maps(rec.probs_over_time(), rec.timesteps, path)`. Under classifier-free guidance wrap the model
    before the guidance, and the recorded batch holds both halves.
    """

    def __init__(self, model: Callable[..., Any]):
        self.model = model
        self.timesteps: list[int] = []
        self.routings: list[Any] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        out, routing = self.model(x, t, y, return_routing=True, **kwargs)
        if routing is not None:  # a DiT has no routing to record
            self.timesteps.append(int(t.reshape(-1)[0]))
            self.routings.append(_detached(routing))
        return out

    def probs_over_time(self) -> torch.Tensor:
        """(S, B, H, W) boundary probabilities, one entry per recorded call."""
        if not self.routings:
            raise ValueError("nothing recorded: the model returned no routing (is it a DC-DiT?)")
        h, w = self.routings[0].grid_size
        return torch.stack([r.probs.reshape(-1, h, w) for r in self.routings])

    def kept_fraction(self) -> torch.Tensor:
        """(S, B) fraction of tokens the backbone ran on at each recorded call."""
        return torch.stack([r.kept_fraction for r in self.routings])


def _detached(routing: Any) -> Any:
    from dataclasses import replace

    return replace(routing, probs=routing.probs.detach().cpu(), router_mask=routing.router_mask.detach().cpu(),
                   mask=routing.mask.detach().cpu())


__all__ = ["boundary_maps", "kept_fraction_curve", "sample_grid", "to_uint8_nhwc", "RoutingRecorder"]
