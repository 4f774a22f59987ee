"""`dcdit bench`: time training steps (forward, backward, AdamW) of models on this machine, with their FLOP rates."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time training steps (forward+backward+AdamW) and report FLOP rates",
        description="Times the training step of each MODEL (the diffusion objective with the ratio loss for DC-DiT, "
                    "then AdamW) on random latents, after warm-up, as the median of repeats. FLOPs per step are "
                    "measured with torch's FlopCounterMode on the step itself. DC-DiT's untrained router is "
                    "calibrated to keep --kept-fraction of the tokens (default 1/N) so that its backbone does the "
                    "work a trained model's would. The machine's matmul rate is measured in the same run.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="preset names, e.g. DiT-S/2 DC-DiT-S")
    p.add_argument("--image-size", type=int, default=256, help="image side; latents are 1/8 of it (default 256)")
    p.add_argument("--pixel", action="store_true", help="pixel-space models: the grid is the image, 3 channels")
    p.add_argument("--batch", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                   help="fp32 and/or bf16 (autocast; router and de-chunk stay fp32); several are timed side by side")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--kept-fraction", type=float, default=None, help="DC-DiT tokens kept (default 1/N)")
    p.add_argument("--reference", action="store_true",
                   help="also time diffusers' DiTTransformer2DModel with each DiT model's config")
    p.add_argument("--attention-backend", default="auto", help="packed attention backend (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each model after the timed ones and print where its time goes "
                        "(encoder, router, packing, backbone, de-chunk, plug-back, decoder, optimizer, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=bench)


def bench(args: argparse.Namespace) -> int:
    from dcdit_platform.perf.speed import BenchSettings, format_table, run_benchmark

    settings = BenchSettings(models=tuple(args.models), image_size=args.image_size, pixel=args.pixel,
                             batch=args.batch, precision=tuple(args.precision), repeats=args.repeats,
                             warmup=args.warmup, kept_fraction=args.kept_fraction, reference=args.reference,
                             attention_backend=args.attention_backend, threads=args.threads, seed=args.seed,
                             profile=args.profile)
    summary = run_benchmark(settings)
    if args.json:
        print_json(summary)
        return 0
    print(format_table(summary))
    return 0
