"""The embedded synthetic dataset: class-conditional textured objects on smooth backgrounds, with detail masks.

Every image is a pure function of (seed, index), rendered in vectorised numpy. Detail (texture and edges) lives
only on the object, so a router that follows detail keeps more tokens there; the mask says where that is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dcdit.errors import DCDiTError

# One row per class: (name, shape, texture, texture colour RGB, contrast colour RGB). Shape, texture and hue all
# differ between classes so that a human (and a classifier) can tell them apart.
_CLASSES = (
    ("checkered disc", "disc", "checker", (215, 35, 35), (250, 235, 220)),
    ("striped square", "square", "stripes", (30, 70, 210), (235, 240, 250)),
    ("dotted triangle", "triangle", "dots", (25, 150, 45), (240, 250, 225)),
    ("bullseye", "disc", "rings", (240, 130, 10), (30, 20, 10)),
    ("hatched cross", "cross", "hatch", (130, 40, 180), (245, 235, 250)),
    ("wavy hexagon", "hexagon", "waves", (0, 170, 190), (10, 30, 40)),
    ("grid diamond", "diamond", "grid", (235, 200, 20), (40, 30, 0)),
    ("speckled ellipse", "ellipse", "speckle", (220, 40, 150), (250, 225, 240)),
    ("zigzag star", "star", "zigzag", (120, 70, 30), (250, 240, 200)),
    ("spoked ring", "ring", "spokes", (20, 120, 110), (235, 255, 245)),
    ("checkered crescent", "crescent", "checker", (90, 90, 100), (250, 250, 120)),
    ("striped pentagon", "pentagon", "diagonal", (180, 20, 60), (20, 20, 20)),
)
CLASS_NAMES: tuple[str, ...] = tuple(row[0] for row in _CLASSES)
MAX_CLASSES = len(_CLASSES)

# Muted background colours; a background is flat or a gentle linear gradient between two of them.
_BACKGROUNDS = np.array([
    (128, 128, 128), (170, 165, 150), (95, 100, 110), (150, 160, 170), (185, 180, 170),
    (110, 105, 95), (140, 150, 135), (160, 140, 140), (75, 80, 85), (200, 200, 195),
], dtype=np.float64)

# Detail pixels: inside the object or within this many pixels of its outline (the anti-aliased edge).
_MASK_MARGIN_PX = 1.0
_CHUNK = 512  # samples rendered at once; bounds memory (a few float64 arrays of CHUNK*H*W)

# splitmix64 constants; a counter-based hash makes each sample independent of which batch renders it.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MUL1
    x = x ^ (x >> np.uint64(27))
    x = x * _MUL2
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, index: np.ndarray, stream: int | np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats keyed by (seed, index, stream); broadcasts index against stream."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        x = _mix64(key + np.asarray(index, dtype=np.uint64) * _GOLDEN)
        x = _mix64(x + np.asarray(stream, dtype=np.uint64) + _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class SyntheticBatch:
    """Rendered samples: images uint8 [B, H, W, 3], labels int64 [B], detail masks bool [B, H, W]."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def synthetic_labels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Sample i has label i mod num_classes: classes stay balanced in every prefix of the dataset."""
    return (np.asarray(indices, dtype=np.int64) % num_classes).astype(np.int64)


def render(indices, *, seed: int = 0, image_size: int = 32, num_classes: int = 10) -> SyntheticBatch:
    """Render the samples `indices` of the synthetic dataset (seed, image_size, num_classes)."""
    _check_params(image_size, num_classes)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
        raise DCDiTError(f"synthetic sample indices must be >= 0, got {int(indices.min())}")
    n, s = indices.size, image_size
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    masks = np.empty((n, s, s), dtype=bool)
    labels = synthetic_labels(indices, num_classes)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        for cls in np.unique(labels[part]):
            rows = np.flatnonzero(labels[part] == cls) + start
            images[rows], masks[rows] = _render_class(indices[rows], int(cls), seed, s)
    return SyntheticBatch(images=images, labels=labels, masks=masks)


def _check_params(image_size: int, num_classes: int) -> None:
    if not 8 <= image_size <= 1024:
        raise DCDiTError(f"synthetic image_size must be in [8, 1024], got {image_size}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DCDiTError(f"synthetic num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")


def _render_class(index: np.ndarray, cls: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    _, shape, texture, colour_a, colour_b = _CLASSES[cls]
    u = lambda stream: _uniform(seed, index, stream)[:, None, None]  # noqa: E731  per-sample scalars, [B,1,1]

    # Pixel centres in image-fraction units, relative to a jittered object centre, in the object's rotated frame.
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    x0 = grid[None, None, :] - (u(0) - 0.5) * 0.2
    y0 = grid[None, :, None] - (u(1) - 0.5) * 0.2
    angle = u(2) * 2 * np.pi
    cos, sin = np.cos(angle), np.sin(angle)
    x, y = cos * x0 + sin * y0, -sin * x0 + cos * y0
    radius = 0.25 + 0.1 * u(3)  # object half-extent, fraction of the image side

    sdf = _shape_sdf(shape, x, y, radius) * size  # signed distance to the outline in pixels (< 0 inside)
    px, py = x * size, y * size  # object frame in pixels: texture periods are in pixels, so detail stays fine
    period = 3.5 + 1.5 * u(4)
    phase = u(5)
    tex = _texture(texture, px, py, period, phase, seed, index, size)

    jitter = lambda stream: (u(stream) - 0.5) * 30  # noqa: E731
    fg_a = np.clip(np.asarray(colour_a, np.float64) + np.concatenate([jitter(10 + c) for c in range(3)], -1), 0, 255)
    fg_b = np.clip(np.asarray(colour_b, np.float64) + np.concatenate([jitter(13 + c) for c in range(3)], -1), 0, 255)
    # Colours are composited in float32 (geometry above stays float64): [B,H,W,3] arrays dominate the cost.
    fg = np.where(tex[..., None], fg_a[:, :, None, :].astype(np.float32), fg_b[:, :, None, :].astype(np.float32))
    bg = _background(u, grid, size)
    coverage = np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)[..., None]  # one-pixel anti-aliased edge
    image = bg + (fg - bg) * coverage
    return np.rint(image).astype(np.uint8), sdf < _MASK_MARGIN_PX


def _polygon_sdf(x, y, radius, sides: int, offset: float = 0.0):
    """Convex regular polygon with circumradius `radius`: max over edge half-planes (exact inside and near edges)."""
    apothem = radius * np.cos(np.pi / sides)
    d = None
    for k in range(sides):
        theta = offset + 2 * np.pi * k / sides
        edge = x * np.cos(theta) + y * np.sin(theta) - apothem
        d = edge if d is None else np.maximum(d, edge)
    return d


def _box_sdf(x, y, half_w, half_h):
    qx, qy = np.abs(x) - half_w, np.abs(y) - half_h
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _shape_sdf(shape: str, x, y, r):
    r_xy = np.hypot(x, y)
    if shape == "disc":
        return r_xy - r
    if shape == "square":
        return _box_sdf(x, y, 0.8 * r, 0.8 * r)
    if shape == "triangle":
        return _polygon_sdf(x, y * -1 + 0.2 * r, 1.15 * r, 3, offset=np.pi / 2)
    if shape == "cross":
        return np.minimum(_box_sdf(x, y, r, 0.38 * r), _box_sdf(x, y, 0.38 * r, r))
    if shape == "hexagon":
        return _polygon_sdf(x, y, r, 6)
    if shape == "diamond":
        return _polygon_sdf(x, y, 1.05 * r, 4)
    if shape == "pentagon":
        return _polygon_sdf(x, y, r, 5, offset=np.pi / 2)
    if shape == "ellipse":
        # Scaled-circle distance: not exact away from the outline, exact enough within a pixel of it.
        a, b = r, 0.6 * r
        k = np.hypot(x / a, y / b)
        return (k - 1.0) * b
    if shape == "star":
        theta = np.arctan2(y, x)
        return (r_xy - r * (0.78 + 0.3 * np.cos(5 * theta))) * 0.8
    if shape == "ring":
        return np.abs(r_xy - 0.75 * r) - 0.32 * r
    if shape == "crescent":
        return np.maximum(r_xy - r, 0.75 * r - np.hypot(x - 0.45 * r, y))
    raise AssertionError(shape)


def _texture(kind: str, px, py, period, phase, seed: int, index: np.ndarray, size: int) -> np.ndarray:
    """Binary texture (True = texture colour) with features one to three pixels wide."""
    frac = lambda v: v - np.floor(v)  # noqa: E731
    if kind == "checker":
        cell = period / 2
        return ((np.floor(px / cell + phase) + np.floor(py / cell + phase)) % 2) == 0
    if kind == "stripes":
        return frac(px / period + phase) < 0.5
    if kind == "diagonal":
        return frac((px + py) / (period * 1.4) + phase) < 0.5
    if kind == "dots":
        dx, dy = frac(px / period + phase) - 0.5, frac(py / period + phase) - 0.5
        return np.hypot(dx, dy) < 0.3
    if kind == "rings":
        return frac(np.hypot(px, py) / period + phase) < 0.5
    if kind == "hatch":
        a, b = (px + py) / period, (px - py) / period
        return (frac(a + phase) < 0.35) | (frac(b + phase) < 0.35)
    if kind == "waves":
        return frac((py + 1.2 * np.sin(px * 2 * np.pi / (2.5 * period))) / period + phase) < 0.5
    if kind == "grid":
        return (frac(px / period + phase) < 0.4) | (frac(py / period + phase) < 0.4)
    if kind == "zigzag":
        tri = np.abs(frac(px / period) - 0.5) * period
        return frac((py + tri) / period + phase) < 0.5
    if kind == "spokes":
        spokes = 10 + 2 * np.round(3 * phase)
        return frac(np.arctan2(py, px) / (2 * np.pi) * spokes + phase) < 0.5
    if kind == "speckle":
        pixel = np.arange(size * size, dtype=np.uint64).reshape(1, size, size)
        return _uniform(seed, index[:, None, None], pixel + np.uint64(1000)) < 0.5
    raise AssertionError(kind)


def _background(u, grid, size: int) -> np.ndarray:
    """Flat (40%) or a linear gradient between two muted colours: no detail anywhere."""
    n_bg = len(_BACKGROUNDS)
    first = _BACKGROUNDS[np.minimum((u(20) * n_bg).astype(int), n_bg - 1)[:, 0, 0]]
    second = _BACKGROUNDS[np.minimum((u(21) * n_bg).astype(int), n_bg - 1)[:, 0, 0]]
    flat = u(22) < 0.4
    second = np.where(flat[:, 0], first, second)  # [B,3]
    angle = u(23) * 2 * np.pi
    ramp = np.clip(np.cos(angle) * grid[None, None, :] + np.sin(angle) * grid[None, :, None] + 0.5, 0, 1)
    first, step = first.astype(np.float32), (second - first).astype(np.float32)
    return first[:, None, None, :] + step[:, None, None, :] * ramp.astype(np.float32)[..., None]


class SyntheticDataset:
    """Map-style synthetic dataset (the embedded default source): sample i is `render([i], ...)`.

    Implements the source protocol the reader uses (`layout`, `sample_shape`, `dtype`, `num_classes`,
    `class_names`, `read(indices)`, `read_masks(indices)`) and `__getitem__` for a torch DataLoader.
    """

    layout = "pixels"
    dtype = "uint8"

    def __init__(self, num_samples: int = 10_000, *, image_size: int = 32, num_classes: int = 10, seed: int = 0):
        _check_params(image_size, num_classes)
        if num_samples < 1:
            raise DCDiTError(f"synthetic num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES[: self.num_classes])

    def describe(self) -> dict:
        """The parameters that determine every sample (recorded as a dataset's source)."""
        return {"kind": "synthetic", "seed": self.seed, "image_size": self.image_size,
                "num_classes": self.num_classes, "num_samples": self.num_samples}

    def __len__(self) -> int:
        return self.num_samples

    def _indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"synthetic index out of range [0, {self.num_samples})")
        return indices

    def render(self, indices) -> SyntheticBatch:
        return render(self._indices(indices), seed=self.seed, image_size=self.image_size,
                      num_classes=self.num_classes)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [B, H, W, 3], labels int64 [B]) for the given sample indices."""
        batch = self.render(indices)
        return batch.images, batch.labels

    def read_masks(self, indices) -> np.ndarray:
        """Detail masks bool [B, H, W] for the given sample indices."""
        return self.render(indices).masks

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image float [3, H, W] in [-1, 1], label): the same conversion as the training reader."""
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(index)
        batch = self.render([index % self.num_samples])
        image = torch.from_numpy(batch.images[0]).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return image, int(batch.labels[0])


def mask_to_tokens(mask, patch_size: int):
    """Fraction of detail pixels in each patch: bool [..., H, W] -> float [..., H/p, W/p] (numpy or torch).

    Threshold the result (e.g. `> 0`) for a binary token mask. H and W must be multiples of `patch_size`.
    """
    h, w = mask.shape[-2:]
    if h % patch_size or w % patch_size:
        raise DCDiTError(f"mask of size {h}x{w} is not divisible into {patch_size}x{patch_size} patches")
    lead = tuple(mask.shape[:-2])
    shape = (*lead, h // patch_size, patch_size, w // patch_size, patch_size)
    if isinstance(mask, torch.Tensor):
        return mask.reshape(shape).float().mean(dim=(-1, -3))
    return np.asarray(mask).reshape(shape).astype(np.float64).mean(axis=(-1, -3))


def detail_auc(scores, mask) -> float:
    """ROC AUC of `scores` (any shape, numpy or torch) for separating mask=True from mask=False positions.

    Tie-aware (a tied positive/negative pair counts 1/2): the Mann-Whitney U statistic from average ranks.
    Pools every position of every sample; NaN when the mask is all True or all False.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    mask = np.asarray(mask).astype(bool).reshape(-1)
    if scores.shape != mask.shape:
        raise DCDiTError(f"detail_auc: scores have {scores.size} values but the mask has {mask.size}")
    n_pos = int(mask.sum())
    n_neg = mask.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: the ranks it spans are (ends - counts, ends].
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][mask].sum()
    u_stat = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))
