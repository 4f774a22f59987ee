"""`dcdit sweep SWEEP.yaml`: run a sweep on Ray Tune (one Ray Train run and one MLflow child run per trial), or
finish one with --resume after its driver died."""

from __future__ import annotations

import argparse

from dcdit_platform import console


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a sweep (grid x baselines) on Ray Tune, compared in MLflow",
        description="Expand SWEEP (YAML: a base experiment, a grid over dotted config keys, DiT baselines, an "
                    "optional ASHA scheduler, resources per trial, an optional evaluation protocol), validate every "
                    "trial, then run one Ray Train run per trial under Ray Tune. MLflow: one parent run for the "
                    "sweep, one child run per trial. --resume finishes a sweep whose driver died: finished trials "
                    "are kept, interrupted ones resume from their checkpoints.")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file, e.g. experiments/smoke-sweep.yaml")
    p.add_argument("--name", default=None, help="sweep name (default: the file's `name`, else its stem)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep of this name (start it if it does not exist yet)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to every trial (repeatable), e.g. -o train.steps=1000")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="storage root: a local path or s3://bucket/prefix (default: the experiment's, ./dcdit-runs); "
                        "the sweep lives in URI/NAME")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: the experiment's tracking.uri, else $MLFLOW_TRACKING_URI, "
                        "else sqlite:///<absolute storage path>/mlflow.db; a server is required with S3)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="an existing Ray cluster: HOST:PORT, or auto for the one `ray start` began on this machine "
                        "(default: the cluster of a Ray job, else a new local one); with token authentication set "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    from dcdit_platform import api
    from dcdit_platform.sweeps import FAILED, format_table

    summary = api.sweep(args.sweep, overrides=args.override, name=args.name, storage=args.storage,
                        tracking_uri=args.tracking_uri, resume=args.resume, address=args.address)
    if args.json:
        console.print_json(summary)
    else:
        print(format_table(summary), flush=True)
    if summary["status"] == "INTERRUPTED":
        console.echo("sweep")("interrupted; finish it with the same command and --resume")
        return 130
    return 1 if summary["status"] == FAILED else 0
