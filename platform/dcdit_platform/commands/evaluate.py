"""`dcdit eval CHECKPOINT`: FID (FD), sFID, IS, KID, precision/recall and GFLOPs of a checkpoint on Ray actors."""

from __future__ import annotations

import argparse

from dcdit.errors import DCDiTError
from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a checkpoint: FID/sFID/IS/KID/precision-recall and GFLOPs, on Ray actors",
        description="Generates --num-samples class-balanced samples with the checkpoint's EMA weights (sample i: its "
                    "own seed, label i mod classes) on Ray actors and compares their features with the reference. "
                    "The numbers do not depend on --workers. Results go next to the run in storage "
                    "(RUN/evaluations/CHECKPOINT/PROTOCOL.json and .png, printed at the end) and to the checkpoint's "
                    "MLflow run. CHECKPOINT is a checkpoint directory or a run directory (its latest checkpoint), "
                    "local or s3://. Checkpoints trained on the synthetic data are scored offline with its domain "
                    "classifier (FD); others with Inception (FID), whose weights must be on the machine.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--num-samples", type=int, default=50_000, help="samples to generate (default 50000: FID-50K)")
    p.add_argument("--workers", type=int, default=None,
                   help="actors (default: one per GPU, else one per CPU of the Ray cluster)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="default ddpm (ADM/DiT protocol)")
    p.add_argument("--sample-steps", type=int, default=250, help="respaced sampling steps (default 250)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (default 1: none; DiT convention: first 3 channels guided)")
    rho = p.add_mutually_exclusive_group()
    rho.add_argument("--tail-drop", type=float, default=None, metavar="RHO",
                     help="DC-DiT elastic inference: drop this fraction of the kept tokens (lowest p)")
    rho.add_argument("--tail-drop-sweep", default=None, metavar="R1,R2,...",
                     help="one evaluation per fraction (the elastic-inference curve: FID and GFLOPs per rho)")
    p.add_argument("--lite-cfg", action="store_true",
                   help="DC-DiT Lite-CFG: the unconditional branch tail-drops 90%% of its tokens (scale 1.25 unless "
                        "--cfg-scale is given)")
    p.add_argument("--reference", default=None, metavar="REF",
                   help="ADM reference batch / statistics .npz, a prepared dataset, an image folder, 'synthetic' or "
                        "'synthetic:seed=0,image_size=16,num_classes=10,num_samples=10000' (default: the "
                        "checkpoint's training data; its statistics are computed once and cached in storage)")
    p.add_argument("--extractor", default=None,
                   help="dcdit-synthetic-classifier (FD and class accuracy; trained once per machine on the "
                        "synthetic data, about a minute, cached in ~/.cache/dcdit/extractors/ and "
                        "STORAGE/_cache/extractors/), inception-v3-compat (FID), or "
                        "another torch-fidelity extractor (FD). Default: the domain classifier for checkpoints "
                        "trained on the synthetic data, else Inception (and Inception whenever --weights is given)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="extractor weights file (Inception offline: weights-inception-2015-12-05-6726825d.pth, or "
                        "put it in $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--export-npz", default=None, metavar="PATH",
                   help="also write the samples as an ADM sample batch (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--metrics", default=",".join(("fid", "sfid", "is", "kid", "pr")), metavar="LIST",
                   help="which of fid,sfid,is,kid,pr to compute (FID/FD always; default all)")
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i uses SeedSequence([seed, i])")
    p.add_argument("--batch-size", type=int, default=64, help="samples per generation batch (default 64)")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="samples per shard, the unit of work and of recomputation (default 1024)")
    p.add_argument("--reference-samples", type=int, default=50_000,
                   help="dataset references: images whose statistics are used (default 50000, seeded subset)")
    p.add_argument("--pr-reference-samples", type=int, default=10_000,
                   help="reference images for precision/recall and KID (default 10000)")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="where results and caches go (default: the storage holding the checkpoint's run)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: the run's own, else $MLFLOW_TRACKING_URI, else sqlite in the "
                        "run's local storage)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (default: start a local one); with token authentication set "
                        "RAY_AUTH_MODE=token")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=eval_command)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DCDiTError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise DCDiTError(f"{flag} is empty")
    return values


def eval_command(args: argparse.Namespace) -> int:
    from dcdit_platform import api
    from dcdit_platform.evaluation.outputs import format_table

    summary = api.evaluate(
        args.checkpoint, num_samples=args.num_samples, workers=args.workers, sampler=args.sampler,
        sample_steps=args.sample_steps, cfg_scale=args.cfg_scale, tail_drop=args.tail_drop,
        tail_drop_sweep=_floats(args.tail_drop_sweep, "--tail-drop-sweep") if args.tail_drop_sweep else None,
        lite_cfg=args.lite_cfg, reference=args.reference, extractor=args.extractor, weights=args.weights,
        export_npz=args.export_npz, storage=args.storage, tracking_uri=args.tracking_uri,
        track=not args.no_tracking, address=args.address, seed=args.seed, batch_size=args.batch_size,
        shard_size=args.shard_size, reference_samples=args.reference_samples,
        pr_reference_samples=args.pr_reference_samples, metrics=args.metrics)
    if args.json:
        print_json(summary)
    else:
        print(format_table(summary), flush=True)
    return 0
