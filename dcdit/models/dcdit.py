"""DC-DiT: patch-1 embed -> conv encoder -> router/chunk -> DiT blocks on kept tokens -> de-chunk -> conv decoder.

The forward pass reads in the order of the paper (arXiv 2603.06351 v2, section "Model"); `forward` returns the
prediction and, on request, the `Routing` that produced it.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.config import ModelConfig
from dcdit.models.attention import Packing
from dcdit.models.chunking import (Routing, dechunk_smooth, gated_residual, kept_coordinates, nearest_kept,
                                   tail_drop_mask)
from dcdit.models.dit import ConditionedBackbone, FinalLayer, sincos_2d, zero_adaln
from dcdit.models.routers import build_router, group_norm

RMS_EPS = 1e-5  # H-Net's RMSNorm epsilon (the release's isotropic stacks)


class ResBlock(nn.Module):
    """SD/LDM conv residual block conditioned on c: GroupNorm, SiLU, conv, + projected c, GroupNorm, SiLU, conv.

    The block computes at the narrower of its two widths and changes width in the conv on the wide side (conv2
    when widening, conv1 when narrowing): this reproduces the paper's parameter counts (34.7M ... 689M), which a
    d x d conv inside the widening block would exceed by 2-3.5%.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_size: int):
        super().__init__()
        mid = min(in_channels, out_channels)
        self.norm1 = group_norm(in_channels, 32)
        self.conv1 = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, mid))
        self.norm2 = group_norm(mid, 32)
        self.conv2 = nn.Conv2d(mid, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        # The convolutions keep PyTorch's default init, as in the release (LDM would zero conv2 instead).

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond_proj(c)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class KeptPositions(nn.Module):
    """2D sin-cos positions of kept tokens at their original grid coordinates, in the frame of a DiT of patch p.

    Grid position (r, c) sits at ((r - (p - 1) / 2) / p, (c - (p - 1) / 2) / p): a patch-p DiT's token (i, j) has
    coordinate (i, j) and covers rows p i .. p i + p - 1, whose centre maps to exactly i. p = 1 is the grid's own
    frame; an upcycled DC-DiT uses its teacher's p, the frame its copied blocks were trained in, while distinct
    positions inside one patch stay distinct (a patch's integer coordinate would give them all one embedding).
    """

    def __init__(self, dim: int, side: int, patch: int = 1):
        super().__init__()
        rows, cols = np.divmod(np.arange(side * side), side)
        shift = (patch - 1) / 2
        table = sincos_2d(dim, (rows - shift) / patch, (cols - shift) / patch)
        self.register_buffer("table", torch.from_numpy(table).float(), persistent=False)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        """(T,) grid indices -> (T, dim) float32 embeddings."""
        return self.table.index_select(0, position)


class DCDiT(ConditionedBackbone):
    """Dynamic Chunking DiT: the DiT backbone runs only on the tokens a learned router keeps."""

    def __init__(self, config: ModelConfig):
        if config.arch != "dcdit":
            raise ValueError(f"DCDiT needs arch='dcdit', got {config.arch!r}")
        config.validate()
        super().__init__(config)
        d, w, side = config.hidden_size, config.scaffold_channels, config.input_size
        self.cond_adaptor = nn.LayerNorm(d) if config.cond_adaptor else nn.Identity()
        self.x_embedder = nn.Conv2d(config.in_channels, w, kernel_size=3, padding=1)
        self.encoder = nn.ModuleList(ResBlock(i, o, d) for i, o in config.scaffold_block_widths(encoder=True))
        self.encoder_norm = nn.RMSNorm(d, eps=RMS_EPS)
        self.residual_proj = nn.Linear(d, d)
        self.router = build_router(config)
        self.positions = KeptPositions(d, side, config.position_patch_size)
        # The inner DiT stack ends in an RMSNorm, as every isotropic stack of H-Net does.
        self.backbone_norm = nn.RMSNorm(d, eps=RMS_EPS)
        self.decoder = nn.ModuleList(ResBlock(i, o, d) for i, o in config.scaffold_block_widths(encoder=False))
        self.decoder_norm = nn.RMSNorm(w, eps=RMS_EPS)
        self.final_layer = FinalLayer(w, 1, config.out_channels, cond_size=d)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The release's init: DiT's xavier pass over every linear (the residual projection included, so it starts
        open, not at zero), the patch-1 embed conv xavier-initialised as a linear, default conv init elsewhere,
        adaLN-Zero, and the router's own init (its last bias at -log(N - 1))."""
        self.init_backbone()
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        zero_adaln(self.blocks, self.final_layer)
        self.router.reset_parameters()  # after the xavier pass, which also visits the cosine router's linears

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                tail_drop: float | torch.Tensor | None = None, return_routing: bool = False,
                force_drop_ids: torch.Tensor | None = None):
        """Predict (B, out_channels, H, W) from latents x (B, C, H, W); with return_routing, also the Routing."""
        b, _, height, width = x.shape
        if height * width != self.positions.table.shape[0]:
            raise ValueError(f"DC-DiT built for a {self.config.input_size}x{self.config.input_size} grid "
                             f"got input of shape {tuple(x.shape)}")
        c = self.condition(t, y, force_drop_ids)
        c_scaffold = self.cond_adaptor(c)

        # 1. Encoder at full resolution (patch size 1), ending in an RMSNorm over d channels.
        grid = self.x_embedder(x)
        for block in self.encoder:
            grid = block(grid, c_scaffold)
        tokens = self.encoder_norm(grid.flatten(2).transpose(1, 2))  # (B, L, d)
        d = tokens.shape[-1]

        # 2-4. Residual branch, router and hard chunking in float32.
        with _fp32(x.device):
            tokens32 = tokens.float()
            residual = self.residual_proj(tokens32)
            probs = self.router(_to_grid(tokens32, height, width), x, t)
            router_mask = probs > 0.5
            mask = tail_drop_mask(router_mask, probs, tail_drop)
        flat, position, coords = kept_coordinates(mask, width)
        packing = Packing.from_lengths(mask.sum(1))
        kept = tokens.reshape(b * height * width, d).index_select(0, flat)
        # Positions at each kept token's original grid coordinate, added just before the DiT blocks. The table is
        # float32 and is not cast: under bf16 autocast it promotes the residual stream to float32, as in the DiT
        # baseline (and the release), so the two compare at equal precision.
        kept = kept + self.positions(position)

        # 5. The DiT backbone on the packed variable-length sequences, ending in an RMSNorm.
        kept = self.backbone_norm(self.run_blocks(kept, c, packing))

        # 6-7. De-chunk smoothing, nearest plug-back, STE gate (the router's own decision) and the residual, in fp32.
        with _fp32(x.device):
            p_kept = probs.reshape(-1).index_select(0, flat)
            smoothed = dechunk_smooth(kept.float(), p_kept, coords, packing, self.config.dechunk_sigma)
            source = nearest_kept(mask, height, width, packing)
            full = smoothed.index_select(0, source.reshape(-1)).view(b, height * width, d)
            tokens = gated_residual(full, probs, router_mask, residual)

        # 8. Decoder mirrors the encoder, then the DiT final layer at patch size 1.
        grid = _to_grid(tokens, height, width).to(grid.dtype)
        for block in self.decoder:
            grid = block(grid, c_scaffold)
        out_tokens = self.final_layer(self.decoder_norm(grid.flatten(2).transpose(1, 2)), c_scaffold)
        out = out_tokens.transpose(1, 2).reshape(b, self.config.out_channels, height, width)
        if not return_routing:
            return out
        return out, Routing(probs=probs, router_mask=router_mask, mask=mask, grid_size=(height, width))


def _to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, L, C) raster tokens -> contiguous (B, C, H, W).

    Without the copy the view is channels-last in memory, the convolutions then produce channels-last weight
    gradients, and DDP warns that they do not match its bucket views (and copies on every step).
    """
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width).contiguous()


def _fp32(device: torch.device):
    """A region where autocast is off, so router and de-chunk arithmetic stays in float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
