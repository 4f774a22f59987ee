"""`dcdit export CHECKPOINT_OR_RUN OUT_DIR [--diffusers]`: a self-describing model directory that
`dcdit.from_pretrained` loads with no YAML, or a diffusers DiTPipeline directory for DiT checkpoints."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="a checkpoint as a self-describing directory (dcdit.from_pretrained) or for diffusers",
        description="Writes OUT_DIR (which must not exist or be empty) with the EMA weights (model.safetensors) and "
                    "dcdit_config.json: the model config, the diffusion, the default sampler settings and the VAE "
                    "of latent models. `dcdit.from_pretrained(OUT_DIR)` rebuilds the model; `dcdit sample OUT_DIR` "
                    "samples from it. With --diffusers (DiT checkpoints only) OUT_DIR is a diffusers DiTPipeline "
                    "directory (transformer/, a DDIM scheduler/ on the training betas, model_index.json); load it "
                    "with DiTPipeline.from_pretrained(OUT_DIR, vae=AutoencoderKL.from_pretrained(...)).")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="a checkpoint or run directory (local or s3://), or a run name in --storage")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--diffusers", action="store_true", help="write a diffusers DiTPipeline directory instead")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="where a run name is looked up (default ./dcdit-runs)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from dcdit_platform import api

    summary = api.export(args.checkpoint, args.out_dir, diffusers=args.diffusers, storage=args.storage)
    print(f"{summary['format']} export of {summary['source']} in {summary['out']}", flush=True)
    if args.json:
        print_json(summary)
    return 0
