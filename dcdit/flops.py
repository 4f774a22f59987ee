"""FLOP accounting: analytic multiply-accumulates (MACs) of one forward pass of one sample, and measured counts.

Convention (the DiT paper's "Gflops", which are MACs): every matrix multiply and convolution, one multiply-add
counted once; norms, activations, softmax, gathers and elementwise arithmetic are free. Attention costs
2 * L^2 * d MACs per block and sample (QK^T and AV), so packed attention costs 2 * d * sum_b L_b^2, never the
padded B * max(L)^2. `MacCount.v2_gflops` gives the DC-DiT v2 convention instead (real FLOPs, attention counted as
H * sum_b L_b^2 * (4 d_head + 3)); `tflops_per_image` turns it into the v2 TFLOPs per generated image (both CFG
branches, or Lite-CFG's unequal ones: `lite_cfg_branches`), `sampling_tflops` does so for measured MACs.

Which terms the DiT paper counted, found by matching its table (Peebles & Xie, Table 4): patch embedding, the
timestep-embedder MLP, every block's qkv / attention / proj / MLP, every block's adaLN linear (6 d^2 per sample;
without it XL/8 is 3% low) and the final layer (adaLN 2 d^2 + linear). This reproduces all eleven published numbers
to within 0.02 GMACs (at most 0.1%, B/4; XL/2 118.62 vs 118.64); eight of eleven round to the printed value. No
subset of matmul terms reproduces all eleven to the printed decimals: the residue is about 2 MACs per token and
block, i.e. elementwise work counted by the paper's (JAX) counter that this convention deliberately leaves out.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                     sdpa_flop_count)

from dcdit.config import ModelConfig
from dcdit.errors import DCDiTError

TIMESTEP_FREQUENCIES = 256  # width of the sinusoidal timestep features fed to the embedder MLP


@dataclass(frozen=True)
class MacCount:
    """Analytic MACs of one forward pass of one sample, by named part, plus what the v2 convention needs."""

    terms: dict[str, float]
    attention_scores: float  # sum over blocks of H * L^2: attention-score entries per sample
    kept_tokens: float | None = None  # DC-DiT: mean tokens the backbone ran on; None for DiT

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    @property
    def v2_gflops(self) -> float:
        """DC-DiT v2 convention: 2 FLOPs per MAC outside attention, H * L^2 * (4 d_head + 3) FLOPs inside."""
        # Attention MACs are 2 * H * L^2 * d_head per block, i.e. 4 d_head FLOPs per score; v2 adds 3 per score.
        return (2 * self.total + 3 * self.attention_scores) / 1e9


def _block_terms(config: ModelConfig, tokens: float, squared_tokens: float) -> dict[str, float]:
    """MACs of `config.depth` DiT blocks on one sample of `tokens` tokens (squared_tokens = its L^2)."""
    d, depth = config.hidden_size, config.depth
    hidden = int(d * config.mlp_ratio)
    return {
        "qkv": depth * 3 * d * d * tokens,
        "attention": depth * 2 * d * squared_tokens,  # QK^T and AV
        "proj": depth * d * d * tokens,
        "mlp": depth * 2 * d * hidden * tokens,
        "adaln": depth * 6 * d * d,  # once per sample, then repeated per token
    }


def dit_macs(config: ModelConfig) -> MacCount:
    """MACs of one DiT forward pass on one sample (the DiT paper's Gflops)."""
    if config.arch != "dit":
        raise DCDiTError(f"dit_macs needs a DiT config, got arch={config.arch!r}; use dcdit.models.forward_macs")
    d, p, n = config.hidden_size, config.patch_size, config.num_tokens
    terms = {
        "patch_embed": config.in_channels * p * p * d * n,
        "t_embedder": TIMESTEP_FREQUENCIES * d + d * d,
        **_block_terms(config, n, n * n),
        "final_adaln": 2 * d * d,
        "final_linear": d * p * p * config.out_channels * n,
    }
    return MacCount({k: float(v) for k, v in terms.items()}, config.depth * config.num_heads * n * n)


def _resblock_macs(in_ch: int, out_ch: int, cond: int, positions: int) -> float:
    """dcdit.models.dcdit.ResBlock: two 3x3 convs at min(in, out) width, 1x1 skip when widths differ."""
    mid = min(in_ch, out_ch)
    skip = in_ch * out_ch * positions if in_ch != out_ch else 0
    return 9 * in_ch * mid * positions + 9 * mid * out_ch * positions + skip + cond * mid


def dcdit_macs(config: ModelConfig, kept_fraction: float | None = None, *,
               kept_tokens: Sequence[int] | torch.Tensor | None = None) -> MacCount:
    """MACs of one DC-DiT forward pass per sample, for a kept fraction (default 1/N) or measured kept counts.

    With `kept_tokens` (one count per sample, e.g. `Routing.kept`), the result is the mean over those samples, so it
    is directly comparable with a measured per-sample count. The scaffold runs at full resolution on every one of the
    L grid positions; the backbone runs on the kept tokens only. Plug-back is a gather (0 MACs) and its nearest-token
    search is elementwise, so neither is counted.
    """
    if config.arch != "dcdit":
        raise DCDiTError(f"dcdit_macs needs a DC-DiT config, got arch={config.arch!r}; use dcdit.models.forward_macs")
    d, w, positions = config.hidden_size, config.scaffold_channels, config.num_tokens
    if kept_tokens is not None:
        if kept_fraction is not None:
            raise DCDiTError("give either kept_fraction or kept_tokens, not both")
        counts = [float(n) for n in torch.as_tensor(kept_tokens).reshape(-1).tolist()]
        if not counts:
            raise DCDiTError("kept_tokens is empty")
    else:
        fraction = 1.0 / config.downsample_factor if kept_fraction is None else float(kept_fraction)
        if not 0.0 < fraction <= 1.0:
            raise DCDiTError(f"kept fraction {fraction} must be in (0, 1]")
        counts = [fraction * positions]
    mean_kept = sum(counts) / len(counts)
    mean_sq = sum(n * n for n in counts) / len(counts)

    encoder = sum(_resblock_macs(i, o, d, positions) for i, o in config.scaffold_block_widths(encoder=True))
    decoder = sum(_resblock_macs(i, o, d, positions) for i, o in config.scaffold_block_widths(encoder=False))
    if config.router == "predictability":
        inner = d // 4
        router = (d * inner + 9 * inner * inner + 9 * inner * inner + inner) * positions
    elif config.router == "cosine":  # q and k projections, then a depthwise 3x3 neighbour sum of the keys
        router = (2 * d * d + 9 * d) * positions + 9 * positions
    else:  # the random and grid controls draw noise: no multiply-accumulates
        router = 0
    terms = {
        "patch_embed": 9 * config.in_channels * w * positions,
        "t_embedder": TIMESTEP_FREQUENCIES * d + d * d,
        "encoder": encoder,
        "residual_proj": d * d * positions,
        "router": router,
        **_block_terms(config, mean_kept, mean_sq),
        "dechunk": d * mean_sq,  # the smoothing matrix (M x M) applied to the kept features (M x d)
        "decoder": decoder,
        "final_adaln": 2 * d * w,
        "final_linear": w * config.out_channels * positions,
    }
    return MacCount({k: float(v) for k, v in terms.items()}, config.depth * config.num_heads * mean_sq, mean_kept)


def tflops_per_image(cond: MacCount, steps: int = 250, uncond: MacCount | None = None) -> float:
    """TFLOPs to generate one image in the v2 convention (`MacCount.v2_gflops`, +3 per attention score): steps x the
    conditional branch, plus the unconditional one when guidance runs it (`uncond=cond` for CFG; Lite-CFG's cheaper
    branch from `lite_cfg_branches`)."""
    per_step = cond.v2_gflops + (uncond.v2_gflops if uncond is not None else 0.0)
    return per_step * steps / 1e3


def lite_cfg_branches(config: ModelConfig, kept_fraction: float | None = None, tail_drop: float = 0.0,
                      uncond_tail_drop: float = 0.9) -> tuple[MacCount, MacCount]:
    """DC-DiT's two Lite-CFG branches: the conditional one at tail drop `tail_drop` (rho) and the unconditional one at
    0.9, both from the router's kept fraction (default 1/N); tail dropping keeps (1 - rho) of the kept tokens."""
    fraction = 1.0 / config.downsample_factor if kept_fraction is None else float(kept_fraction)
    for rho in (tail_drop, uncond_tail_drop):
        if not 0.0 <= rho < 1.0:
            raise DCDiTError(f"tail-drop fraction {rho} must be in [0, 1)")
    return (dcdit_macs(config, fraction * (1 - tail_drop)), dcdit_macs(config, fraction * (1 - uncond_tail_drop)))


def sampling_tflops(gmacs: float, steps: int = 250, cfg: bool = False) -> float:
    """TFLOPs to generate one image from measured MACs: 2 FLOPs per MAC x sampling steps, x2 when both CFG branches
    are counted. A FLOP counter does not see softmax, so this lacks the v2 convention's +3 per attention score."""
    return 2.0 * gmacs * steps * (2 if cfg else 1) / 1e3


def dit_params(config: ModelConfig) -> int:
    """Trainable parameters of a DiT, in closed form (equals counting `DiT(config).parameters()`)."""
    if config.arch != "dit":
        raise DCDiTError(f"dit_params needs a DiT config, got arch={config.arch!r}")
    d, p, hidden = config.hidden_size, config.patch_size, int(config.hidden_size * config.mlp_ratio)
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + (6 * d * d + 6 * d)
    out = p * p * config.out_channels
    return (config.in_channels * p * p * d + d
            + TIMESTEP_FREQUENCIES * d + d + d * d + d
            + (config.num_classes + int(config.class_dropout_prob > 0)) * d
            + config.depth * block
            + 2 * d * d + 2 * d + d * out + out)


# --- measured ------------------------------------------------------------------------------------------------------

def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _varlen_pairs(q: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> int:
    """H x sum_b Lq_b Lk_b: the attention scores of a packed varlen call."""
    lengths_q, lengths_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    return q.shape[1] * sum(lq * lk for lq, lk in zip(lengths_q, lengths_k, strict=True))


def varlen_forward_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs) -> int:
    """flash-attn's varlen forward (q, k, v: (T, H, D)): QK^T and AV per sample, 4 d_head FLOPs per score."""
    return 2 * _varlen_pairs(q, cu_seqlens_q, cu_seqlens_k) * (q.shape[2] + v.shape[2])


def varlen_backward_flops(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, *args,
                          **kwargs) -> int:
    """flash-attn's varlen backward: torch's SDPA backward count per sample (scores recomputed, dP, dV, dQ, dK)."""
    return 2 * _varlen_pairs(q, cu_seqlens_q, cu_seqlens_k) * (3 * q.shape[2] + 2 * v.shape[2])


def register_varlen_attention_flops(forward_op, backward_op) -> None:
    """Register the varlen formulas with torch's FLOP counter for ops laid out as flash-attn's
    `_flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)` and `_flash_attn_varlen_backward(dout,
    q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, ...)`; torch has none, so packed DC-DiT
    attention would count 0 on GPUs with flash-attn while a DiT's SDPA is counted. Registering twice is a no-op."""
    for op, formula in ((forward_op, varlen_forward_flops), (backward_op, varlen_backward_flops)):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(formula)


def _register_flash_attn() -> None:
    """flash-attn (>= 2.6) registers its kernels as torch ops; give them the varlen formulas when it is installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return
    import flash_attn  # noqa: F401  (registers torch.ops.flash_attn.*)

    ops = getattr(torch.ops, "flash_attn", None)
    if ops is not None and hasattr(ops, "_flash_attn_varlen_forward"):
        register_varlen_attention_flops(ops._flash_attn_varlen_forward, ops._flash_attn_varlen_backward)


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, also counting SDPA's CPU flash kernel (which torch leaves uncounted, as 0) and
    flash-attn's varlen kernels when installed (`register_varlen_attention_flops`).

    Counts are FLOPs (2 per MAC). Every per-sample SDPA call of the packed-attention loop is counted with its own
    length, so packed attention comes out as H x sum_b L_b^2 terms.
    """
    _register_flash_attn()
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@torch.no_grad()
def measure_macs(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **forward_kwargs) -> float:
    """Measured MACs per sample of one forward pass of `model(x, t, y, **forward_kwargs)` on a real batch."""
    with flop_counter() as counter:
        model(x, t, y, **forward_kwargs)
    return counter.get_total_flops() / 2 / x.shape[0]


@torch.no_grad()
def calibrate_router(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     kept_fraction: float) -> torch.Tensor:
    """Shift DC-DiT's router bias so that about `kept_fraction` of the batch's tokens are kept; returns kept counts.

    For measuring and benchmarking untrained models, whose router keeps almost nothing (at init every p is near
    1/N < 0.5). A uniform logit shift keeps the router's ranking, so the kept set is what a trained router with that
    budget would keep given these weights. Only the v2 predictability router has a logit bias to shift.
    """
    router = getattr(model, "router", None)
    scorer = getattr(router, "scorer", None)
    if scorer is None:
        raise DCDiTError("calibrate_router needs a DC-DiT with the predictability router (model.router.scorer)")
    if not 0.0 < kept_fraction <= 1.0:
        raise DCDiTError(f"kept fraction {kept_fraction} must be in (0, 1]")
    was_training = model.training
    model.eval()
    try:
        _, routing = model(x, t, y, return_routing=True)
        probs = routing.probs.double().clamp(1e-12, 1 - 1e-12)
        logits = torch.log(probs) - torch.log1p(-probs)
        # The first and last tokens are always kept; the shift places the rest around the requested quantile.
        inner = logits[:, 1:-1].reshape(-1)
        target = kept_fraction * logits.numel() - 2 * logits.shape[0]
        keep_inner = min(max(target / max(inner.numel(), 1), 0.0), 1.0)
        if keep_inner >= 1.0:
            shift = float(-inner.min()) + 1.0
        elif keep_inner <= 0.0:
            shift = float(-inner.max()) - 1.0
        else:
            ordered = inner.sort(descending=True).values
            k = max(1, min(inner.numel(), round(keep_inner * inner.numel())))
            upper = ordered[k - 1]
            lower = ordered[k] if k < inner.numel() else upper - 2.0
            shift = float(-(upper + lower) / 2)  # halfway between the last kept and the first dropped logit
        scorer[-1].bias.add_(shift)
        _, routing = model(x, t, y, return_routing=True)
    finally:
        model.train(was_training)
    return routing.kept


def kept_fraction_of(kept: torch.Tensor, config: ModelConfig) -> float:
    """Mean kept fraction of a batch from per-sample kept counts."""
    return float(kept.double().mean()) / config.num_tokens


__all__ = ["MacCount", "dit_macs", "dcdit_macs", "tflops_per_image", "lite_cfg_branches", "sampling_tflops",
           "dit_params", "flop_counter", "register_varlen_attention_flops", "measure_macs", "calibrate_router",
           "kept_fraction_of"]

