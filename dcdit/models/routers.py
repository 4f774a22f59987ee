"""The routers: which patch-1 tokens DC-DiT's backbone runs on, as boundary probabilities p (kept where p > 0.5).

Learned: the v2 spatial-predictability router and the v1 cosine router (arXiv 2603.06351). Controls at the same
budget, with no parameters: `RandomRouter` (the paper's "random boundaries") and `GridRouter` (fixed patchify).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.config import ModelConfig


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with `groups` groups, or the largest divisor of `channels` below it for narrow test models."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def force_ends(p: torch.Tensor) -> torch.Tensor:
    """p with the first and last token set to 1 (always kept), as H-Net's routers do."""
    ones = torch.ones_like(p[:, :1])
    return torch.cat([ones, p[:, 1:-1], ones], dim=1) if p.shape[1] > 1 else ones


class PredictabilityRouter(nn.Module):
    """v2 spatial-predictability router: a token is a boundary when its neighbours do not predict it."""

    def __init__(self, dim: int, downsample_factor: float):
        super().__init__()
        inner = dim // 4
        self.project = nn.Conv2d(dim, inner, kernel_size=1)
        self.predict = nn.Conv2d(inner, inner, kernel_size=3, padding=1)
        self.scorer = nn.Sequential(
            nn.Conv2d(inner, inner, kernel_size=3, padding=1), group_norm(inner, 8), nn.SiLU(),
            nn.Conv2d(inner, 1, kernel_size=1))
        self.downsample_factor = downsample_factor
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Start near the target: sigmoid(bias) = 1/N, i.e. -log(N - 1): -1.0986 at N = 4, the release's fixed -1.1.
        nn.init.constant_(self.scorer[-1].bias, -math.log(self.downsample_factor - 1.0))

    def logits(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) -> boundary logits (B, H*W)."""
        z = self.project(grid)
        residual = z - self.predict(z)
        return self.scorer(residual).flatten(1)

    def forward(self, grid: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return force_ends(torch.sigmoid(self.logits(grid)))


class CosineRouter(nn.Module):
    """v1 2D cosine router: p = (1 - q . mean of the 8 neighbours' keys) / 2, keys and queries l2-normalised."""

    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # H-Net starts both projections at the identity: p then measures raw feature change.
        nn.init.eye_(self.q_proj.weight)
        nn.init.eye_(self.k_proj.weight)

    def probs(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) -> (B, H*W) boundary probabilities (before the ends are forced)."""
        b, d, h, w = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)
        q = F.normalize(self.q_proj(tokens), dim=-1)
        k = F.normalize(self.k_proj(tokens), dim=-1).transpose(1, 2).reshape(b, d, h, w)
        ring = torch.ones(1, 1, 3, 3, device=grid.device, dtype=grid.dtype)
        ring[..., 1, 1] = 0
        neighbour_sum = F.conv2d(k.reshape(b * d, 1, h, w), ring, padding=1).reshape(b, d, h * w)
        neighbour_count = F.conv2d(torch.ones(1, 1, h, w, device=grid.device, dtype=grid.dtype), ring, padding=1)
        k_bar = (neighbour_sum / neighbour_count.reshape(1, 1, h * w)).transpose(1, 2)
        return ((1 - (q * k_bar).sum(-1)) / 2).clamp(0.0, 1.0)

    def forward(self, grid: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return force_ends(self.probs(grid))


class RandomRouter(nn.Module):
    """Control: each token is kept with probability 1/N whatever the image ("random boundaries", v1 ablation).

    p is noise at the right rate: with u ~ U(0, 1) per token, p = 1 - u N / 2 in (0.5, 1] when u < 1/N (kept) and
    p = (1 - u) / (2 (1 - 1/N)) in [0, 0.5] otherwise, so kept tokens' confidences are U(0.5, 1) and de-chunk
    smoothing and tail dropping (which drops the lowest p) see uninformative values in the learned router's range.
    First and last token forced, as for the learned routers. u comes from `sample_uniforms`: per sample and step.
    """

    def __init__(self, downsample_factor: float):
        super().__init__()
        self.downsample_factor = downsample_factor

    def reset_parameters(self) -> None:
        pass

    def forward(self, grid: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = self.downsample_factor
        u = sample_uniforms(x, t, grid.shape[2] * grid.shape[3])
        return force_ends(torch.where(u < 1 / n, 1 - u * n / 2, (1 - u) / (2 * (1 - 1 / n))))


class GridRouter(nn.Module):
    """Control: fixed patchify inside DC-DiT's scaffold. N = p * p; one token per p x p patch is kept, at offset
    (p - 1) // 2 in both directions, so that nearest plug-back (ties to the earlier token in raster order) sends
    every position of a patch to that patch's token. Kept tokens get confidences U(0.5, 1) as under `RandomRouter`
    (only the placement differs between the two controls); the others p = 0. No ends are forced: exactly L / N kept.
    """

    def __init__(self, patch: int, side: int):
        super().__init__()
        index = torch.arange(side * side)
        rows, cols = torch.div(index, side, rounding_mode="floor"), index % side
        offset = (patch - 1) // 2
        self.register_buffer("lattice", (rows % patch == offset) & (cols % patch == offset), persistent=False)

    def reset_parameters(self) -> None:
        pass

    def forward(self, grid: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = sample_uniforms(x, t, grid.shape[2] * grid.shape[3])
        return torch.where(self.lattice, 1 - u / 2, torch.zeros_like(u))


_HASH_SEED = 0x9E3779B1  # seeds the fixed odd 16-bit multipliers of the input hash; any fixed value works


def sample_uniforms(x: torch.Tensor, t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) float32 uniforms in [0, 1), sample b's from its own generator seeded by a hash of its input x[b]
    (exact float32 bits) and timestep t[b].

    The controls' randomness is thereby a function of the sample alone: reproducible, new at every training step
    and denoising step (x_t changes), and independent of the batch a sample shares and of the worker count.
    """
    b = x.shape[0]
    bits = x.detach().float().reshape(b, -1).contiguous().view(torch.int32).long() & 0xFFFFFFFF
    n = bits.shape[1]
    gen = torch.Generator().manual_seed(_HASH_SEED)
    weights = (torch.randint(0, 1 << 15, (2, n), generator=gen) * 2 + 1).to(x.device)
    # 16-bit halves times 16-bit weights, reduced mod 2^40 before mixing in t: no step comes near 2^63, so the
    # hash is exact integer arithmetic on every device.
    digest = ((bits & 0xFFFF) * weights[0] + (bits >> 16) * weights[1]).sum(1) % (1 << 40)
    digest = digest * 1_000_003 + t.detach().long().to(x.device)
    out = torch.empty(b, length, device=x.device)
    for i, seed in enumerate(digest.tolist()):
        sample_gen = torch.Generator(device=x.device).manual_seed(seed)
        out[i] = torch.rand(length, generator=sample_gen, device=x.device)
    return out


def build_router(config: ModelConfig) -> nn.Module:
    """The router a DC-DiT config names."""
    d = config.hidden_size
    if config.router == "predictability":
        return PredictabilityRouter(d, config.downsample_factor)
    if config.router == "cosine":
        return CosineRouter(d)
    if config.router == "random":
        return RandomRouter(config.downsample_factor)
    return GridRouter(config.grid_patch, config.input_size)


__all__ = ["PredictabilityRouter", "CosineRouter", "RandomRouter", "GridRouter", "build_router", "sample_uniforms",
           "group_norm", "force_ends"]
