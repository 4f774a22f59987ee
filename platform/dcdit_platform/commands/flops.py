"""`dcdit flops`: parameters and multiply-accumulates of one forward pass, analytic and (with --measure) measured."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "flops", help="parameters, GFLOPs per forward pass and TFLOPs per generated image",
        description="Counts the FLOPs of one forward pass of one sample and the TFLOPs per image in the DC-DiT v2 "
                    "convention (2 FLOPs per multiply-accumulate, +3 per attention score), next to the "
                    "multiply-accumulates the DiT paper's table calls 'Gflops' (DiT-XL/2 = 118.6 GMACs); per image: "
                    "the forward FLOPs x sampling steps x branches (--cfg: two; --lite-cfg: the unconditional one at "
                    "tail drop 0.9). DC-DiT is counted analytically at a kept fraction (default 1/N); --measure also "
                    "runs the model under "
                    "torch's FlopCounterMode on a random batch, its untrained router calibrated to that fraction.")
    p.add_argument("model", metavar="MODEL", help="preset name, e.g. DiT-XL/2 or DC-DiT-B")
    p.add_argument("--image-size", type=int, default=256, help="image side; latents are 1/8 of it (default 256)")
    p.add_argument("--pixel", action="store_true", help="pixel-space model: the grid is the image, 3 channels")
    p.add_argument("--kept-fraction", type=float, default=None, help="DC-DiT tokens kept (default 1/N)")
    p.add_argument("--measure", action="store_true", help="also measure on a real batch with FlopCounterMode")
    p.add_argument("--batch", type=int, default=4, help="samples in the measured batch (default 4)")
    p.add_argument("--sampling-steps", type=int, default=250, help="steps per generated image (default 250)")
    p.add_argument("--cfg", action="store_true", help="count both classifier-free guidance branches")
    p.add_argument("--lite-cfg", action="store_true",
                   help="DC-DiT's Lite-CFG: count the unconditional branch at tail drop 0.9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=flops)


def flops(args: argparse.Namespace) -> int:
    from dcdit_platform.perf.costs import CostQuery, flops_summary

    summary = flops_summary(CostQuery(model=args.model, image_size=args.image_size, pixel=args.pixel,
                                      kept_fraction=args.kept_fraction, sampling_steps=args.sampling_steps,
                                      cfg=args.cfg, lite_cfg=args.lite_cfg, measure=args.measure,
                                      batch=args.batch, seed=args.seed))
    if args.json:
        print_json(summary)
        return 0
    line = (f"{summary['model']}: {summary['params'] / 1e6:.1f}M params, {summary['v2_gflops']:.2f} GFLOPs per forward "
            f"({summary['gmacs']:.2f} GMACs, the unit the DiT paper calls 'Gflops'), "
            f"{summary['tflops_per_image']:.2f} TFLOPs per image ({summary['sampling_steps']} steps, "
            f"{summary['cfg_branches_counted']} CFG branch{'es' if args.cfg else ''})")
    if "kept_fraction" in summary:
        line += f" at kept fraction {summary['kept_fraction']:.3f}"
    print(line)
    if "measured" in summary:
        m = summary["measured"]
        print(f"measured on a batch of {m['batch']}: {2 * m['gmacs']:.2f} GFLOPs per sample (2 per counted "
              "multiply-accumulate)" + (f" at kept fraction {m['kept_fraction']:.3f} (analytic at those counts: "
                                        f"{2 * m['analytic_gmacs_at_kept']:.2f})" if "kept_fraction" in m else ""))
    return 0
