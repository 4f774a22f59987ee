"""`dcdit study`: issue #11's CPU-scale study (sweep, upcycling runs, FD curves, report) in one command."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="run the CPU-scale study of the paper's claims (experiments/study) and report on them",
        description="Starts an embedded local Ray and a local MLflow store (sqlite) under --out and runs the study of "
                    "experiments/study/: its sweep (DC-DiT N=4 with the learned, random and grid routers, N=16, the "
                    "FLOP-matched DiT/2, DiT/4 and the DiT/2 teacher, each at 2 seeds), then the upcycling runs of "
                    "upcycle.yaml (the teacher upcycled into DC-DiT, distillation warm-up, a quarter of the steps), "
                    "then FD at every kept checkpoint, then the report, whose study section answers the paper's "
                    "claims a-f with their spread over seeds. Running the same command again reuses what is done.")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default ./dcdit-study)")
    p.add_argument("--config", default=None, metavar="SWEEP.yaml",
                   help="the study's sweep (default experiments/study/sweep.yaml; upcycle.yaml is read next to it)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="training steps of the from-scratch runs (default: the sweep's); checkpoints and warm-ups "
                        "scale with it: a pilot")
    p.add_argument("--seeds", type=int, default=None, metavar="K", help="use the first K seeds only (a pilot)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=study_command)


def study_command(args: argparse.Namespace) -> int:
    from dcdit_platform.study import run_study

    summary = run_study(args.out, config=args.config, steps=args.steps, seeds=args.seeds)
    if args.json:
        print_json(summary)
    else:
        print(f"study finished in {summary['wall_s']:.0f} s: report {summary['report_html']}", flush=True)
        for line in summary["study"]:
            print(f"  - {line}", flush=True)
    return 0
