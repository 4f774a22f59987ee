"""`dcdit bench`: time training steps (forward, backward, AdamW) of models on this machine, with their FLOP rates,
(--mode sample) full sampling with guidance and tail drop against a baseline, or (--mode memory) the analytic memory
of a training step."""

from __future__ import annotations

import argparse

from dcdit.errors import DCDiTError
from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time training steps (forward+backward+AdamW) or sampling, and report FLOP rates",
        description="Times the training step of each MODEL (the diffusion objective with the ratio loss for DC-DiT, "
                    "then AdamW) on random latents, after warm-up, as the median of repeats. FLOPs per step are "
                    "measured with torch's FlopCounterMode on the step itself. DC-DiT's untrained router is "
                    "calibrated to keep --kept-fraction of the tokens (default 1/N) so that its backbone does the "
                    "work a trained model's would. The machine's matmul rate is measured in the same run. "
                    "--mode sample times full sampling of a batch instead (--steps, --sampler; a DiT with CFG, a "
                    "DC-DiT with each --guidance and --rho) and prints each case's seconds and GFLOPs per image and "
                    "its wall-clock saving over its FLOP saving against --baseline. --mode memory prints the analytic "
                    "memory of a training step per worker (state and saved activations) for each model, --image-size "
                    "and --precision at --batch (default 32), on --device's attention paths.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="preset names, e.g. DiT-S/2 DC-DiT-S")
    p.add_argument("--mode", choices=("train", "sample", "memory"), default="train",
                   help="time training steps (default) or sampling, or print the memory model's table")
    p.add_argument("--image-size", type=int, nargs="+", default=[256],
                   help="image side; latents are 1/8 of it (default 256; several with --mode memory)")
    p.add_argument("--pixel", action="store_true", help="pixel-space models: the grid is the image, 3 channels")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per step (default 8) or images per sampling call (default 4)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="fp32 and/or bf16 (autocast; router and de-chunk stay fp32); several are timed side by side "
                        "(default fp32; both with --mode memory)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 5; sample 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; sample 1)")
    p.add_argument("--kept-fraction", type=float, default=None, help="DC-DiT tokens kept (default 1/N)")
    p.add_argument("--reference", action="store_true",
                   help="also time diffusers' DiTTransformer2DModel with each DiT model's config")
    p.add_argument("--attention-backend", default="auto", help="packed attention backend (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each model after the timed ones and print where its time goes "
                        "(encoder, router, packing, backbone, de-chunk, plug-back, decoder, optimizer, ...)")
    p.add_argument("--steps", type=int, default=2, help="sample mode: sampling steps (default 2; ratios are per step)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="sample mode: sampler (default ddim)")
    p.add_argument("--guidance", nargs="+", choices=("cfg", "lite-cfg"), default=["cfg", "lite-cfg"],
                   help="sample mode: DC-DiT guidance (a DiT always runs CFG)")
    p.add_argument("--rho", nargs="+", type=float, default=[0.0, 0.2, 0.4],
                   help="sample mode: DC-DiT tail-drop fractions (default 0 0.2 0.4)")
    p.add_argument("--baseline", default=None,
                   help="sample mode: the model the savings are measured against (default: the first DiT)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="memory mode: whose attention paths the activations follow (default cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=bench)


def bench(args: argparse.Namespace) -> int:
    if args.mode == "memory":
        return _bench_memory(args)
    if len(args.image_size) != 1:
        raise DCDiTError("several --image-size values are for --mode memory; time one size per run")
    args.image_size, args.precision = args.image_size[0], args.precision or ["fp32"]
    if args.mode == "sample":
        return _bench_sampling(args)
    from dcdit_platform.perf.speed import BenchSettings, format_table, run_benchmark

    settings = BenchSettings(models=tuple(args.models), image_size=args.image_size, pixel=args.pixel,
                             batch=args.batch or 8, precision=tuple(args.precision),
                             repeats=5 if args.repeats is None else args.repeats,
                             warmup=2 if args.warmup is None else args.warmup, kept_fraction=args.kept_fraction,
                             reference=args.reference, attention_backend=args.attention_backend,
                             threads=args.threads, seed=args.seed, profile=args.profile)
    return _show(run_benchmark(settings), args.json, format_table)


def _bench_sampling(args: argparse.Namespace) -> int:
    from dcdit_platform.perf.sampling_speed import SampleBenchSettings, format_sample_table, run_sample_benchmark

    if args.pixel or args.reference or args.profile or args.precision != ["fp32"]:
        raise DCDiTError("--mode sample times fp32 latent models: drop --pixel, --reference, --profile and "
                         "--precision")
    settings = SampleBenchSettings(models=tuple(args.models), baseline=args.baseline, image_size=args.image_size,
                                   batch=args.batch or 4, steps=args.steps, sampler=args.sampler,
                                   guidance=tuple(args.guidance), rhos=tuple(args.rho),
                                   kept_fraction=args.kept_fraction,
                                   repeats=3 if args.repeats is None else args.repeats,
                                   warmup=1 if args.warmup is None else args.warmup,
                                   attention_backend=args.attention_backend, threads=args.threads, seed=args.seed)
    return _show(run_sample_benchmark(settings), args.json, format_sample_table)


def _bench_memory(args: argparse.Namespace) -> int:
    from dcdit_platform.perf.memory import MemoryQuery, format_memory_table, memory_table

    precision = tuple(args.precision or ("fp32", "bf16"))
    query = MemoryQuery(models=tuple(args.models), image_sizes=tuple(args.image_size), batch=args.batch or 32,
                        precision=precision, device=args.device, kept_fraction=args.kept_fraction)
    return _show(memory_table(query), args.json, format_memory_table)


def _show(summary: dict, as_json: bool, formatter) -> int:
    if as_json:
        print_json(summary)
    else:
        print(formatter(summary))
    return 0
