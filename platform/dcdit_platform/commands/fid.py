"""`dcdit fid INPUT1 INPUT2`: the Frechet distance between two image folders, sample npz files or statistics files."""

from __future__ import annotations

import argparse

from dcdit_platform import console
from dcdit_platform.console import print_json, warn


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fid", help="FID between two image folders, sample npz files (arr_0) or statistics npz files",
        description="Same math as `dcdit eval` (float64 statistics, real-valued Frechet distance), in one process. "
                    "INPUT is an image folder (searched recursively), an npz with arr_0 = uint8 NHWC images, or an "
                    "npz with statistics (ADM reference batches: mu, sigma; `--save-stats` output). With a "
                    "non-Inception extractor the distance is reported as FD. Offline default: without Inception "
                    "weights (in $TORCH_HOME/hub/checkpoints/ or --weights), the distance is FD in the features of "
                    "the domain classifier of the synthetic data (seed 0, 16 px, 10 classes), trained once (about a "
                    "minute) and cached in ~/.cache/dcdit/extractors/; a line on stderr says so.")
    p.add_argument("input1", metavar="INPUT1")
    p.add_argument("input2", metavar="INPUT2")
    p.add_argument("--extractor", default=None,
                   help="inception-v3-compat (FID; the default when its weights are here), dcdit-synthetic-classifier "
                        "(FD; the offline default, the synthetic data's classifier unless --weights names another "
                        "classifier file), or another torch-fidelity extractor (FD)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="extractor weights file (offline: weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--batch-size", type=int, default=64, help="images per extractor batch (default 64)")
    p.add_argument("--save-stats", default=None, metavar="PATH",
                   help="also save INPUT1's statistics as an npz (mu, sigma, sums) for later comparisons")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=fid_command)


def fid_command(args: argparse.Namespace) -> int:
    from dcdit_platform.evaluation import fid_between

    out = fid_between(args.input1, args.input2, extractor=args.extractor, weights=args.weights,
                      batch_size=args.batch_size, save_stats=args.save_stats, echo=console.echo("fid"))
    for message in out.get("warnings", ()):
        warn("fid", message)
    if args.json:
        print_json(out)
    else:
        name = "fid" if "fid" in out else "fd"
        line = f"{name.upper()}: {out[name]:.6f}"
        if "sfid" in out:
            line += f"   sFID: {out['sfid']:.6f}"
        print(f"{line}   ({out['n1']} vs {out['n2']} samples, {out['extractor']})"
              + (f"\n  statistics of INPUT1: {out['saved_stats']}" if out.get("saved_stats") else ""), flush=True)
    return 0
