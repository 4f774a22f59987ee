"""`dcdit report SWEEP`: the HTML/Markdown/CSV report of a sweep's MLflow runs, attached to its parent run."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="HTML/Markdown/CSV report of a sweep: table, quality vs GFLOPs, routing, boundary maps",
        description="Collects the sweep's MLflow runs (the parent run named SWEEP, or with that run id, and its "
                    "child runs): one row per run, evaluations grouped by protocol (runs evaluated under different "
                    "protocols are never ranked together), a quality-vs-GFLOPs Pareto plot, kept fraction vs "
                    "timestep, loss curves, and, for DC-DiT runs on the synthetic data, the router on real images "
                    "from each run's latest checkpoint scored against the ground-truth detail masks (AUC). Writes "
                    "report.html (self-contained), report.md, runs.csv and report.json, and attaches them to the "
                    "parent run under report/.")
    p.add_argument("sweep", metavar="SWEEP_NAME_OR_RUN_ID", help="the sweep's name or its parent MLflow run id")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default ./dcdit-reports/NAME)")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="the storage root the sweep ran with, where checkpoints are found (default: where each run "
                        "recorded them); also sets the default tracking URI (its mlflow.db)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: sqlite in --storage, else $MLFLOW_TRACKING_URI, else "
                        "./dcdit-runs/mlflow.db)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip routing real images through the checkpoints (no detail AUC, no boundary maps)")
    p.add_argument("--probe-images", type=int, default=64, metavar="N",
                   help="held-out synthetic images routed per timestep for the detail AUC (default 64)")
    p.add_argument("--no-attach", action="store_true", help="do not attach the report to the parent MLflow run")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from dcdit_platform import api
    from dcdit_platform.reports import format_summary

    summary = api.report(args.sweep, tracking_uri=args.tracking_uri, storage=args.storage, out=args.out,
                         attach=not args.no_attach, probe=not args.no_probe, probe_images=args.probe_images)
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary), flush=True)
    return 0
