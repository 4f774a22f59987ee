"""Analytic memory of one training step: parameters, gradients, AdamW's moments, the EMA copy, DDP's gradient buckets
and the activations autograd saves for the backward pass, counted tensor by tensor from the architecture (DiT blocks
on n tokens; DC-DiT's scaffold at full resolution and its backbone on the kept tokens) for fp32 or bf16 autocast.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from dcdit.config import ModelConfig, preset
from dcdit.errors import DCDiTError
from dcdit.models import count_params, family_of
from dcdit.models.attention import MATH_ATTENTION_MAX_SCORES

# Bytes per parameter of the training state: fp32 weights, gradients, AdamW's two moments, the EMA copy and DDP's
# gradient buckets (separate from .grad unless gradient_as_bucket_view; DDP wraps the model with several workers only).
STATE_BYTES = {"params": 4, "grads": 4, "optimizer": 8, "ema": 4, "ddp_buckets": 4}
STATE_BYTES_PER_PARAM = sum(STATE_BYTES.values())
# The diffusion loss (MSE plus the learned-variance VLB: Gaussian KL and discretised likelihood, elementwise in
# fp32) saves about 20 latent-sized fp32 tensors and two boolean ones; under 0.5% of any model's activations.
LOSS_BYTES_PER_LATENT = 20 * 4 + 2
FREQUENCY_SIZE = 256  # the timestep embedder's sinusoidal features
PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
# Counting builds the model on the meta device (a second for DiT-XL); a table asks for each config several times.
_param_count = functools.lru_cache(maxsize=64)(count_params)


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of one worker's training step at micro-batch `batch`: the state per parameter and, per part of the
    model, the activations saved for backward; `weight_copies` are autocast's bf16 casts of weights that the
    backward pass keeps (zero in fp32)."""

    params: int
    batch: int
    precision: str
    state: dict[str, int]
    activations: dict[str, int]
    weight_copies: int

    @property
    def state_total(self) -> int:
        return sum(self.state.values())

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values()) + self.weight_copies

    @property
    def total(self) -> int:
        return self.state_total + self.activation_total


@dataclass(frozen=True)
class _Sizes:
    """What the counting needs: `act` bytes of a matmul's (cast) operands and outputs, `stream` of the fp32 residual
    stream and norms (the float32 position table promotes it, in the DiT baseline too)."""

    act: int
    stream: int = 4
    fp32: int = 4
    index: int = 8


def training_memory(config: ModelConfig, batch: int, precision: str = "fp32", *, device: str = "cuda",
                    kept_fraction: float | None = None, ddp: bool = True) -> TrainingMemory:
    """The model's estimate for `batch` samples per worker in `precision` ("fp32", or "bf16" autocast) on `device`
    ("cpu" picks the attention paths dcdit.models.attention takes there); routed models keep `kept_fraction` of
    their positions (default 1/N)."""
    if precision not in PRECISIONS or device not in DEVICES or batch < 1:
        raise DCDiTError(f"memory model: precision must be one of {PRECISIONS}, device one of {DEVICES} and batch "
                         f">= 1; got {precision!r}, {device!r}, {batch}")
    sizes = _Sizes(act=2 if precision == "bf16" else 4)
    params = _param_count(config)
    state = {k: v * params for k, v in STATE_BYTES.items() if ddp or k != "ddp_buckets"}
    if family_of(config).routed:
        fraction = 1.0 / config.downsample_factor if kept_fraction is None else kept_fraction
        parts = _dcdit_parts(config, batch, sizes, device, max(1.0, config.num_tokens * fraction))
        copies = _dcdit_cast_weights(config)
    else:
        parts = _dit_parts(config, batch, sizes, device)
        copies = _dit_cast_weights(config)
    parts = {k: round(v) for k, v in parts.items()}
    return TrainingMemory(params=params, batch=batch, precision=precision, state=state, activations=parts,
                          weight_copies=2 * copies if precision == "bf16" else 0)


def _conditioning(d: int, s: _Sizes) -> float:
    """Per sample: the timestep features (cast for the first linear), that linear's output (the SiLU's input) and
    the SiLU's output, the class index, and the conditioning vector c (float32: the class embedding is) that every
    adaLN and scaffold SiLU saves (one storage)."""
    return FREQUENCY_SIZE * s.act + 2 * d * s.act + s.index + d * s.fp32


def _attention(n: float, d: int, h: int, batch: int, s: _Sizes, device: str, packed: bool) -> float:
    """Per token: what attention over n tokens per sample saves. Flash-style kernels (SDPA, flash-attn varlen, the
    CPU flash kernel) keep q, k, v (views of the qkv projection), the output and a float32 log-sum-exp per head; bf16
    training on CPU takes matmul + softmax instead (dcdit.models.attention._attend, up to MATH_ATTENTION_MAX_SCORES
    score entries per call) and keeps the bf16 probabilities h x n per token instead of the log-sum-exp. On CPU the
    packed path runs one call per sample and concatenates the outputs (one more d per token, except in the math
    path, whose per-sample outputs are not saved)."""
    scores_per_call = h * n * n * (1 if packed else batch)
    math = device == "cpu" and s.act == 2 and scores_per_call <= MATH_ATTENTION_MAX_SCORES
    if math:
        # Uniform: q, k, v are reshaped out of their head-major views (copies); packed: views of the qkv storage.
        return 3 * d * s.act + h * n * s.act + d * s.act
    out = d * s.act * (2 if packed and device == "cpu" else 1)
    return 3 * d * s.act + out + h * s.fp32


def _block_per_token(config: ModelConfig, n: float, batch: int, s: _Sizes, device: str, packed: bool) -> float:
    """Bytes one DiT block saves per token: the residual stream entering each half and both LayerNorms' outputs and
    statistics (float32), the modulated inputs of the qkv and fc1 projections (cast), attention, the projection and
    fc2 outputs (kept for the gates), fc1 and GELU outputs. On packed (variable-length) tokens the per-sample
    modulation is copied to every token: its (T, 6d) storage (the gates are views of it) and the two 1 + scale
    factors are then per token."""
    d, r = config.hidden_size, config.mlp_ratio
    per_token = 2 * (d * s.stream + 2 * s.fp32 + d * s.stream + d * s.act)  # stream, mean/rstd, norm out, modulated
    per_token += _attention(n, d, config.num_heads, batch, s, device, packed) + d * s.act  # attention, proj out
    per_token += 2 * r * d * s.act + d * s.act  # fc1 and GELU outputs, fc2 output
    if packed:
        per_token += 6 * d * s.act + 2 * d * s.act
    return per_token


def _block_per_sample(config: ModelConfig, packed: bool, s: _Sizes) -> float:
    """Per sample and block: the adaLN SiLU's cast output and, with equal lengths, the (B, 6d) modulation (the gates
    are views of it) and the two 1 + scale factors."""
    d = config.hidden_size
    return d * s.act + (0 if packed else 8 * d * s.act)


def _dit_parts(config: ModelConfig, batch: int, s: _Sizes, device: str) -> dict[str, float]:
    n = config.num_tokens
    d, c, grid = config.hidden_size, config.in_channels, config.input_size ** 2
    blocks = config.depth * batch * (n * _block_per_token(config, n, batch, s, device, False)
                                     + _block_per_sample(config, False, s))
    # Final layer: the last block's output (its LayerNorm input) with statistics, the LayerNorm output and the
    # modulated input of the linear; per sample the SiLU output and 1 + scale.
    final = batch * (n * (d * s.stream + 2 * s.fp32 + d * s.stream + d * s.act) + 2 * d * s.act)
    return {"conditioning": batch * _conditioning(d, s), "embed": batch * grid * c * s.act, "backbone": blocks,
            "final layer": final, "loss": batch * grid * c * LOSS_BYTES_PER_LATENT}


def _resblock(in_ch: int, out_ch: int, d: int, positions: int, s: _Sizes) -> float:
    """Per sample: a scaffold ResBlock saves its input, GroupNorm output and SiLU output at the input width and the
    same three at its inner width (conv1 output + conditioning, GroupNorm, SiLU), GroupNorm statistics, and the cast
    SiLU output of its conditioning projection. The 1x1 skip reads the saved input."""
    mid = min(in_ch, out_ch)
    stats = 2 * (math.gcd(32, in_ch) + math.gcd(32, mid)) * s.fp32  # mean and rstd per group (routers.group_norm)
    return positions * 3 * (in_ch + mid) * s.act + stats + d * s.act


def _rms_norm(width: int, positions: float, s: _Sizes) -> float:
    """An RMSNorm saves its (float32) input, the normalised input and one rstd per position."""
    return positions * (2 * width * s.fp32 + s.fp32)


def _router(config: ModelConfig, positions: int, s: _Sizes) -> float:
    """Per sample, in float32. Predictability router: its grid copy of the tokens, then five maps at d/4 (projection,
    residual, scorer conv, GroupNorm, SiLU) and the sigmoid's output; cosine router: the shared input, q and k
    before and after normalisation and the neighbour mean; the controls save nothing."""
    d = config.hidden_size
    if config.router == "predictability":
        return positions * (d + 5 * (d // 4) + 1) * s.fp32 + 2 * math.gcd(8, d // 4) * s.fp32
    if config.router == "cosine":
        return positions * 6 * d * s.fp32
    return 0.0


def _dcdit_parts(config: ModelConfig, batch: int, s: _Sizes, device: str, kept: float) -> dict[str, float]:
    """Activations of DC-DiT: encoder and decoder at every grid position, the backbone on `kept` tokens per sample
    (all samples assumed equal, so the de-chunk's padding to the longest sample is not counted)."""
    d, w, c, grid = config.hidden_size, config.scaffold_channels, config.in_channels, config.input_size ** 2
    encoder = grid * c * s.act + sum(_resblock(i, o, d, grid, s) for i, o in config.scaffold_block_widths(encoder=True))
    encoder += _rms_norm(d, grid, s)
    # The residual projection's input: a contiguous float32 copy (the RMSNorm keeps the grid's channel-major layout).
    residual = grid * d * s.fp32
    packing = 2 * kept * s.index  # the kept tokens' gather index and each token's sample (per-token modulation)
    blocks = config.depth * (kept * _block_per_token(config, kept, batch, s, device, True)
                             + _block_per_sample(config, True, s))
    backbone = blocks + _rms_norm(d, kept, s)
    # De-chunk (float32): the Gaussian weights, their normalised copy and the bmm's operand (three M x M), the
    # padded features and the smoothed ones, and per-token confidences and gather indices.
    dechunk = 3 * kept * kept * s.fp32 + 2 * kept * d * s.fp32 + kept * (6 * s.fp32 + 2 * s.index)
    # Plug-back's gather index per position, and the gate: the plugged-back features, the gate and the router mask.
    plug_back = grid * (s.index + d * s.fp32 + s.fp32 + 1)
    decoder = sum(_resblock(i, o, d, grid, s) for i, o in config.scaffold_block_widths(encoder=False))
    decoder += _rms_norm(w, grid, s)
    # Final layer on the RMSNorm's output (in the scaffold's dtype): LayerNorm input, statistics and output, the
    # modulated input of the linear; per sample the SiLU output and 1 + scale.
    final = grid * (3 * w * s.act + 2 * s.act) + d * s.act + w * s.act
    per_sample = {"conditioning": _conditioning(d, s), "encoder": encoder, "router": _router(config, grid, s),
                  "residual": residual, "packing": packing, "backbone": backbone, "de-chunk": dechunk,
                  "plug-back": plug_back, "decoder": decoder, "final layer": final,
                  "loss": grid * c * LOSS_BYTES_PER_LATENT}
    return {k: batch * v for k, v in per_sample.items()}


def _block_weights(config: ModelConfig) -> int:
    """Matmul weights of one DiT block: qkv, proj, fc1, fc2 and the adaLN projection."""
    d, hidden = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    return 3 * d * d + d * d + 2 * d * hidden + 6 * d * d


def _dit_cast_weights(config: ModelConfig) -> int:
    """Weights whose bf16 casts autocast's backward keeps: every block's, the timestep MLP's second linear, the
    patch embedding and the final layer (the first timestep linear's input needs no gradient)."""
    d, p, c = config.hidden_size, config.patch_size, config.in_channels
    return (config.depth * _block_weights(config) + d * d + c * p * p * d + 2 * d * d
            + d * p * p * config.out_channels)


def _dcdit_cast_weights(config: ModelConfig) -> int:
    """As for DiT, with the scaffold's convolutions and conditioning projections instead of the patch embedding;
    the router and the residual projection run in float32 (no casts)."""
    d, w = config.hidden_size, config.scaffold_channels
    scaffold = 9 * config.in_channels * w
    for i, o in config.scaffold_block_widths(encoder=True) + config.scaffold_block_widths(encoder=False):
        mid = min(i, o)
        scaffold += 9 * i * mid + 9 * mid * o + d * mid + (i * o if i != o else 0)
    return config.depth * _block_weights(config) + d * d + scaffold + 2 * d * w + w * config.out_channels


@dataclass(frozen=True, kw_only=True)
class MemoryQuery:
    """The `dcdit bench --mode memory` flags: every model at every image size and precision."""

    models: tuple[str, ...]
    image_sizes: tuple[int, ...] = (256,)  # latents are 1/8 of it
    batch: int = 32
    precision: tuple[str, ...] = PRECISIONS
    device: str = "cuda"
    kept_fraction: float | None = None
    ddp: bool = True


def memory_table(query: MemoryQuery) -> dict:
    """One row per (model, image size, precision): the state and activation bytes by kind, and the total."""
    rows = []
    for size in query.image_sizes:
        if size < 8 or size % 8:
            raise DCDiTError(f"--image-size {size} must be a positive multiple of 8 (the VAE factor)")
        for name in query.models:
            config = preset(name, input_size=size // 8)
            for precision in query.precision:
                m = training_memory(config, query.batch, precision, device=query.device,
                                    kept_fraction=query.kept_fraction, ddp=query.ddp)
                rows.append({"model": name, "image_size": size, "precision": precision, "param_count": m.params,
                             **m.state, "activations": sum(m.activations.values()),
                             "weight_copies": m.weight_copies, "total": m.total, "parts": m.activations})
    return {"rows": rows, "batch": query.batch, "device": query.device, "ddp": query.ddp,
            "note": "bytes per worker of one training step: fp32 state (weights, gradients, AdamW moments, EMA, DDP "
                    "buckets) and the tensors autograd saves for backward; the CUDA context, the caching "
                    "allocator's slack and transient backward buffers are not counted"}


def format_memory_table(summary: dict) -> str:
    gib = 2.0 ** 30
    state = [k for k in STATE_BYTES if summary["rows"] and k in summary["rows"][0]]
    lines = [f"training memory per worker, batch {summary['batch']}, {summary['device']} attention paths (GiB)",
             f"{'model':<12} {'image':>5} {'prec':<5} " + " ".join(f"{k:>11}" for k in state)
             + f" {'activations':>11} {'w. copies':>9} {'total':>8}"]
    for r in summary["rows"]:
        lines.append(f"{r['model']:<12} {r['image_size']:>5} {r['precision']:<5} "
                     + " ".join(f"{r[k] / gib:>11.2f}" for k in state)
                     + f" {r['activations'] / gib:>11.2f} {r['weight_copies'] / gib:>9.2f} {r['total'] / gib:>8.2f}")
    return "\n".join(lines)


__all__ = ["TrainingMemory", "training_memory", "STATE_BYTES", "STATE_BYTES_PER_PARAM", "PRECISIONS", "MemoryQuery",
           "memory_table", "format_memory_table"]
