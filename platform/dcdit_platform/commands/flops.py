"""`dcdit flops`: parameters and multiply-accumulates of one forward pass, analytic and (with --measure) measured."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "flops", help="parameters, GMACs per forward pass and TFLOPs per generated image",
        description="Counts multiply-accumulates of one forward pass of one sample (the DiT paper's 'Gflops': "
                    "DiT-XL/2 = 118.6) and TFLOPs per image = 2 x MACs x sampling steps (x2 with --cfg). DC-DiT "
                    "is counted analytically at a kept fraction (default 1/N); --measure also runs the model under "
                    "torch's FlopCounterMode on a random batch, its untrained router calibrated to that fraction.")
    p.add_argument("model", metavar="MODEL", help="preset name, e.g. DiT-XL/2 or DC-DiT-B")
    p.add_argument("--image-size", type=int, default=256, help="image side; latents are 1/8 of it (default 256)")
    p.add_argument("--pixel", action="store_true", help="pixel-space model: the grid is the image, 3 channels")
    p.add_argument("--kept-fraction", type=float, default=None, help="DC-DiT tokens kept (default 1/N)")
    p.add_argument("--measure", action="store_true", help="also measure on a real batch with FlopCounterMode")
    p.add_argument("--batch", type=int, default=4, help="samples in the measured batch (default 4)")
    p.add_argument("--sampling-steps", type=int, default=250, help="steps per generated image (default 250)")
    p.add_argument("--cfg", action="store_true", help="count both classifier-free guidance branches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=flops)


def flops_summary(args: argparse.Namespace) -> dict:
    from dcdit.config import preset
    from dcdit.errors import DCDiTError
    from dcdit.flops import count_params, sampling_tflops
    from dcdit.models import forward_macs

    if args.image_size < 1 or (not args.pixel and args.image_size % 8):
        raise DCDiTError(f"--image-size {args.image_size} must be a positive multiple of 8 (the VAE factor); "
                         "use --pixel for pixel-space models")
    overrides = dict(input_size=args.image_size, in_channels=3) if args.pixel else dict(
        input_size=args.image_size // 8)
    config = preset(args.model, **overrides)
    if args.kept_fraction is not None and config.arch != "dcdit":
        raise DCDiTError(f"--kept-fraction applies to DC-DiT models; {args.model} runs on every patch")
    macs = forward_macs(config, args.kept_fraction)
    summary = {
        "model": args.model, "arch": config.arch, "image_size": args.image_size, "input_size": config.input_size,
        "params": count_params(config), "gmacs": round(macs.gmacs, 4),
        "tflops_per_image": round(sampling_tflops(macs.gmacs, args.sampling_steps, args.cfg), 4),
        "sampling_steps": args.sampling_steps, "cfg_branches_counted": 2 if args.cfg else 1,
        "v2_gflops": round(macs.v2_gflops, 4),
        "breakdown_gmacs": {k: round(v / 1e9, 4) for k, v in macs.terms.items()},
        "convention": "gmacs: multiply-accumulates of one forward pass of one sample (matmuls and convolutions, "
                      "attention 2 d sum_b L_b^2 per block); v2_gflops: FLOPs with attention counted as "
                      "H sum_b L_b^2 (4 d_head + 3) (DC-DiT v2)",
    }
    if config.arch == "dcdit":
        fraction = (1.0 / config.downsample_factor if args.kept_fraction is None else args.kept_fraction)
        summary.update(kept_fraction=fraction, kept_tokens=round(macs.kept_tokens, 2),
                       tokens=config.num_tokens, downsample_factor=config.downsample_factor,
                       **_baselines(config, args.kept_fraction))
    if args.measure:
        summary["measured"] = _measure(config, args)
    return summary


def _baselines(config, kept_fraction: float | None) -> dict:
    """The v1 comparison DiTs for this DC-DiT (deepened; see dcdit.baselines)."""
    from dcdit.baselines import flop_matched_dit, param_matched_dit
    from dcdit.flops import dit_macs, dit_params

    def describe(dit) -> dict:
        return {"depth": dit.depth, "hidden_size": dit.hidden_size, "num_heads": dit.num_heads,
                "patch_size": dit.patch_size, "params": dit_params(dit), "gmacs": round(dit_macs(dit).gmacs, 4)}

    return {"param_matched_dit": describe(param_matched_dit(config)),
            "flop_matched_dit": describe(flop_matched_dit(config, kept_fraction=kept_fraction))}


def _measure(config, args: argparse.Namespace) -> dict:
    import torch

    from dcdit.errors import DCDiTError
    from dcdit.flops import calibrate_router, dcdit_macs, measure_macs, sampling_tflops
    from dcdit.models import build_model

    if args.batch < 1:
        raise DCDiTError("--batch must be >= 1")
    torch.manual_seed(args.seed)
    model = build_model(config).eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    y = torch.randint(0, config.num_classes, (args.batch,), generator=gen)
    measured: dict = {"batch": args.batch}
    if config.arch == "dcdit":
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


def flops(args: argparse.Namespace) -> int:
    summary = flops_summary(args)
    if args.json:
        print_json(summary)
        return 0
    line = (f"{summary['model']}: {summary['params'] / 1e6:.1f}M params, {summary['gmacs']:.2f} GMACs per forward, "
            f"{summary['tflops_per_image']:.2f} TFLOPs per image ({summary['sampling_steps']} steps, "
            f"{summary['cfg_branches_counted']} CFG branch{'es' if args.cfg else ''})")
    if "kept_fraction" in summary:
        line += f" at kept fraction {summary['kept_fraction']:.3f}"
    print(line)
    if "measured" in summary:
        m = summary["measured"]
        print(f"measured on a batch of {m['batch']}: {m['gmacs']:.2f} GMACs per sample"
              + (f" at kept fraction {m['kept_fraction']:.3f} (analytic at those counts: "
                 f"{m['analytic_gmacs_at_kept']:.2f})" if "kept_fraction" in m else ""))
    return 0
