"""`dcdit sample CHECKPOINT_OR_RUN --class C ...`: PNG images named by class and seed, decoded through the VAE for
latent models, with an optional grid and, for DC-DiT, boundary maps."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="images from a checkpoint, a run or an export: one PNG per class and seed",
        description="Draws --per-class images of each --class into --out as class{C:04d}_seed{S}.png (seeds S, "
                    "S+1, ...). An image depends only on the model, its class, its seed and the sampling settings: "
                    "never on the batch it shares or on --per-class. CHECKPOINT_OR_RUN is a checkpoint directory, a "
                    "run directory (its latest checkpoint; local or s3://), a run name in --storage, a `dcdit "
                    "export` directory (whose sampling settings are the defaults), or an MLflow model "
                    "(models:/NAME/VERSION, models:/m-ID) of $MLFLOW_TRACKING_URI's server. Latent models are "
                    "decoded through the VAE of their training data (or --vae DIR).")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN")
    p.add_argument("--class", dest="classes", type=int, nargs="+", required=True, metavar="C",
                   help="class labels to draw, e.g. --class 207 88")
    p.add_argument("--per-class", type=int, default=1, metavar="K", help="images per class (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of each class's first image (default 0)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="default ddpm (or the export's)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="sampling steps (default 250)")
    p.add_argument("--cfg-scale", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale on the first 3 eps channels (default 1: none)")
    p.add_argument("--lite-cfg", action="store_true",
                   help="DC-DiT's Lite-CFG: a tail-dropped unconditional branch (scale 1.25 unless --cfg-scale)")
    p.add_argument("--tail-drop", type=float, default=None, metavar="RHO",
                   help="DC-DiT: drop this fraction of the kept tokens at inference")
    p.add_argument("--vae", default=None, metavar="DIR", help="AutoencoderKL directory (or hub name) for latents")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default dcdit-samples/RUN-stepSTEP)")
    p.add_argument("--grid", action="store_true", help="also write grid.png (one row per class)")
    p.add_argument("--boundaries", action="store_true",
                   help="DC-DiT: also write each image's router boundary maps (class..._boundaries.png)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="where a run name is looked up (default ./dcdit-runs)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=sample_command)


def sample_command(args: argparse.Namespace) -> int:
    from dcdit_platform import api

    summary = api.sample(args.checkpoint, args.classes, storage=args.storage, per_class=args.per_class,
                         seed=args.seed, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                         lite_cfg=args.lite_cfg, tail_drop=args.tail_drop, vae=args.vae, out=args.out, grid=args.grid,
                         boundaries=args.boundaries, batch_size=args.batch_size)
    extra = (" and grid.png" if "grid" in summary else "") + \
        (f" and {len(summary['boundary_maps'])} boundary map(s)" if "boundary_maps" in summary else "")
    print(f"{len(summary['files'])} image(s){extra} in {summary['out']}", flush=True)
    if args.json:
        print_json(summary)
    return 0
