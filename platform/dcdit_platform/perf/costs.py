"""What a model costs, for `dcdit flops`: parameters, analytic MACs per forward pass (by part), TFLOPs per generated
image, the matched DiT baselines of a routed model, and optionally the MACs measured with torch's FLOP counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcdit.baselines import flop_matched_dit, param_matched_dit
from dcdit.config import preset
from dcdit.errors import DCDiTError
from dcdit.flops import (calibrate_router, dcdit_macs, dit_macs, dit_params, lite_cfg_branches, measure_macs,
                         sampling_tflops, tflops_per_image)
from dcdit.models import build_model, count_params, family_of, forward_macs


@dataclass(frozen=True, kw_only=True)
class CostQuery:
    """The `dcdit flops` flags."""

    model: str
    image_size: int = 256
    pixel: bool = False
    kept_fraction: float | None = None
    sampling_steps: int = 250
    cfg: bool = False
    lite_cfg: bool = False  # DC-DiT's Lite-CFG: the unconditional branch at tail drop 0.9
    measure: bool = False
    batch: int = 4
    seed: int = 0


def flops_summary(args: CostQuery) -> dict:
    if args.image_size < 1 or (not args.pixel and args.image_size % 8):
        raise DCDiTError(f"--image-size {args.image_size} must be a positive multiple of 8 (the VAE factor); "
                         "use --pixel for pixel-space models")
    overrides = dict(input_size=args.image_size, in_channels=3) if args.pixel else dict(
        input_size=args.image_size // 8)
    config = preset(args.model, **overrides)
    routed = family_of(config).routed
    if args.kept_fraction is not None and not routed:
        raise DCDiTError(f"--kept-fraction applies to DC-DiT models; {args.model} runs on every patch")
    if args.lite_cfg and not routed:
        raise DCDiTError(f"--lite-cfg drops tokens of a DC-DiT's unconditional branch; {args.model} has no router "
                         "(use --cfg)")
    macs = forward_macs(config, args.kept_fraction)
    uncond = lite_cfg_branches(config, args.kept_fraction)[1] if args.lite_cfg else macs if args.cfg else None
    summary = {
        "model": args.model, "arch": config.arch, "image_size": args.image_size, "input_size": config.input_size,
        "params": count_params(config), "gmacs": round(macs.gmacs, 4),
        "tflops_per_image": round(tflops_per_image(macs, args.sampling_steps, uncond), 4),
        "sampling_steps": args.sampling_steps, "cfg_branches_counted": 1 if uncond is None else 2,
        "guidance": "lite-cfg" if args.lite_cfg else "cfg" if args.cfg else "none",
        "v2_gflops": round(macs.v2_gflops, 4),
        "breakdown_gmacs": {k: round(v / 1e9, 4) for k, v in macs.terms.items()},
        "convention": "gmacs: multiply-accumulates of one forward pass of one sample (matmuls and convolutions, "
                      "attention 2 d sum_b L_b^2 per block); v2_gflops: FLOPs with attention counted as "
                      "H sum_b L_b^2 (4 d_head + 3) (DC-DiT v2); tflops_per_image: v2 FLOPs x steps x branches "
                      "(Lite-CFG: the unconditional branch at tail drop 0.9); measured: 2 FLOPs per counted MAC",
    }
    if routed:
        fraction = (1.0 / config.downsample_factor if args.kept_fraction is None else args.kept_fraction)
        summary.update(kept_fraction=fraction, kept_tokens=round(macs.kept_tokens, 2),
                       tokens=config.num_tokens, downsample_factor=config.downsample_factor,
                       **_baselines(config, args.kept_fraction))
    if args.measure:
        summary["measured"] = _measure(config, args)
    return summary


def _baselines(config, kept_fraction: float | None) -> dict:
    """The v1 comparison DiTs for this DC-DiT (deepened; see dcdit.baselines)."""
    def describe(dit) -> dict:
        return {"depth": dit.depth, "hidden_size": dit.hidden_size, "num_heads": dit.num_heads,
                "patch_size": dit.patch_size, "params": dit_params(dit), "gmacs": round(dit_macs(dit).gmacs, 4)}

    return {"param_matched_dit": describe(param_matched_dit(config)),
            "flop_matched_dit": describe(flop_matched_dit(config, kept_fraction=kept_fraction))}


def _measure(config, args: CostQuery) -> dict:
    if args.batch < 1:
        raise DCDiTError("--batch must be >= 1")
    torch.manual_seed(args.seed)
    model = build_model(config).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    y = torch.randint(0, config.num_classes, (args.batch,), generator=gen)
    measured: dict = {"batch": args.batch}
    if family_of(config).routed:
        fraction = (1.0 / config.downsample_factor if args.kept_fraction is None else args.kept_fraction)
        kept = calibrate_router(model, x, t, y, fraction)
        analytic = dcdit_macs(config, kept_tokens=kept)
        measured.update(kept_tokens=kept.tolist(), kept_fraction=round(float(kept.double().mean()) /
                                                                       config.num_tokens, 4),
                        analytic_gmacs_at_kept=round(analytic.gmacs, 4),
                        router="untrained weights, bias calibrated to the kept fraction")
    gmacs = measure_macs(model, x, t, y) / 1e9
    measured.update(gmacs=round(gmacs, 4),
                    tflops_per_image=round(sampling_tflops(gmacs, args.sampling_steps, args.cfg), 4))
    return measured


__all__ = ["CostQuery", "flops_summary"]
