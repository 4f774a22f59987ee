"""DiT (Peebles & Xie): embedders, the adaLN-Zero block, the final layer, and the fixed-patch baseline.

Blocks run on packed token sequences (`attention.Packing`) so that DC-DiT can reuse them unchanged on its
variable-length kept tokens; for the DiT baseline every sample has the same length. Parameter names follow the
public DiT checkpoints (DiT-XL-2-256x256.pt), which therefore load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.config import ModelConfig
from dcdit.models.attention import Packing, packed_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(len(positions), dim) sin-cos features of scalar positions: first half sin, second half cos."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """2D sin-cos embedding at (row, col) grid coordinates, laid out as DiT does: column features first."""
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def grid_sincos(dim: int, height: int, width: int) -> torch.Tensor:
    """(height * width, dim) float32 embedding of a raster-ordered grid."""
    rows, cols = np.divmod(np.arange(height * width), width)
    return torch.from_numpy(sincos_2d(dim, rows, cols)).float()


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> vectors: sinusoidal features followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def frequency_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.frequency_features(t, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row `num_classes` is the null class that classifier-free guidance drops to."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embed `labels`; samples whose `force_drop_ids` is 1 get the null class. The training objective passes its
        per-sample draws (dcdit.objective.draw_samples) and guidance its unconditional branch; only a training
        forward without them draws the dropout here, from the global RNG (one batch-sized draw)."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention over packed tokens, restricted to each sample."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        tokens, dim = x.shape
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, dim // self.num_heads).unbind(1)
        return self.proj(packed_attention(q, k, v, packing).reshape(tokens, dim))


class Mlp(nn.Module):
    """The transformer MLP: Linear, tanh-approximated GELU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning, on packed (T, d) tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, packing: Packing) -> torch.Tensor:
        mod = self.adaLN_modulation(c)  # once per sample
        if packing.is_uniform and packing.batch_size > 0:
            # Equal lengths (every DiT batch): each sample's modulation broadcasts over its (n, d) tokens instead of
            # being copied to every token, which made autograd keep a (T, 6d) modulation and two (T, d) factors
            # 1 + scale in every block. Every element is computed as with the copy (tests/dcdit/test_restructured).
            tokens = x.view(packing.batch_size, -1, x.shape[-1])
            out = self._modulated(tokens, mod[:, None],
                                  lambda h: self.attn(h.reshape(x.shape), packing).view(tokens.shape))
            return out.view(x.shape)
        return self._modulated(x, packing.per_token(mod), lambda h: self.attn(h, packing))

    def _modulated(self, x: torch.Tensor, mod: torch.Tensor,
                   attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block on tokens x with a modulation that broadcasts against them; `attend` maps like-x to like-x."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * attend(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cond_size: int | None = None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, L, hidden), c: (B, cond) -> (B, L, p*p*out)."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (a strided convolution)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_dit_weights(module: nn.Module) -> None:
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings; adaLN-Zero is applied by the owner."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def zero_adaln(blocks: nn.ModuleList, final_layer: FinalLayer) -> None:
    """adaLN-Zero: every block starts as the identity and the model's output starts at zero."""
    for block in blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(final_layer.linear.weight)
    nn.init.zeros_(final_layer.linear.bias)


class ConditionedBackbone(nn.Module):
    """What DiT and DC-DiT share: timestep and class embedders and the stack of DiT blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth))

    def init_backbone(self) -> None:
        init_dit_weights(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def condition(self, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, packing: Packing) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c, packing)
        return x


class DiT(ConditionedBackbone):
    """The DiT baseline: fixed p x p patchify, DiT blocks on every patch, linear unpatchify."""

    def __init__(self, config: ModelConfig):
        if config.arch != "dit":
            raise ValueError(f"DiT needs arch='dit', got {config.arch!r}")
        config.validate()
        super().__init__(config)
        d, p = config.hidden_size, config.patch_size
        self.x_embedder = PatchEmbed(p, config.in_channels, d)
        grid = config.input_size // p
        self.register_buffer("pos_embed", grid_sincos(d, grid, grid)[None], persistent=True)
        self.final_layer = FinalLayer(d, p, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.init_backbone()
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        zero_adaln(self.blocks, self.final_layer)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        b, p, c = x.shape[0], self.config.patch_size, self.config.out_channels
        side = int(math.isqrt(x.shape[1]))
        x = x.reshape(b, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, side * p, side * p)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """Patches with their positions, packed: (B * n, d) tokens and their (uniform) packing."""
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        b, n, d = tokens.shape
        return tokens.reshape(b * n, d), Packing.uniform(b, n, device=x.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, return_routing: bool = False,
                force_drop_ids: torch.Tensor | None = None):
        """Predict (B, out_channels, H, W); with return_routing, also the routing (None: DiT does not route)."""
        c = self.condition(t, y, force_drop_ids)
        tokens, packing = self.embed(x)
        tokens = self.run_blocks(tokens, c, packing).view(x.shape[0], -1, tokens.shape[-1])
        out = self.unpatchify(self.final_layer(tokens, c))
        return (out, None) if return_routing else out

    def block_outputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """(B, n, d) output of every block for inputs x, timesteps t and labels y taken as given (no class dropout;
        y may hold the null class): what an upcycling teacher provides."""
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        tokens, packing = self.embed(x)
        outputs = []
        for block in self.blocks:
            tokens = block(tokens, c, packing)
            outputs.append(tokens.view(x.shape[0], -1, tokens.shape[-1]))
        return outputs
