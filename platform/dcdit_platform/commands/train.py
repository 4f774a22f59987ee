"""`dcdit train CONFIG` (a new run, or the same --name again to resume it) and `dcdit resume NAME`."""

from __future__ import annotations

import argparse

from dcdit.errors import DCDiTError
from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or resume a DiT / DC-DiT run on Ray Train (DDP), tracked in MLflow",
        description="Train the experiment in CONFIG (YAML; `_base_: other.yaml` inherits). Running the same "
                    "command again, or with the same --name, resumes the run exactly from its latest checkpoint "
                    "in the same MLflow run. The config is validated before Ray starts. Checkpoints go to "
                    "STORAGE/NAME/, sample grids and boundary maps to the MLflow run's artifacts (samples/); the "
                    "paths are printed at the end.")
    p.add_argument("config", metavar="CONFIG", help="experiment YAML, e.g. experiments/smoke.yaml")
    p.add_argument("--name", default=None,
                   help="run name (default: the config's `name`, else <file stem>-<config hash>)")
    _common(p, example="-o train.lr=2e-4 -o train.steps=1000")
    p.set_defaults(func=train_command)

    p = subparsers.add_parser(
        "resume", help="resume a run by name from its latest checkpoint",
        description="Continue run NAME from its latest valid checkpoint with the config it was started with "
                    "(read from the storage). Overrides may change only what does not alter the science "
                    "(train.steps, checkpoint.*, logging.*, resources.*, ...).")
    p.add_argument("name", metavar="NAME")
    _common(p, example="-o train.steps=2000 -o checkpoint.every=500")
    p.set_defaults(func=resume_command)


def _common(p: argparse.ArgumentParser, *, example: str) -> None:
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dotted override, value parsed as YAML (repeatable): {example}")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="storage root: a local path or s3://bucket/prefix (default ./dcdit-runs)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: the experiment's tracking.uri, else $MLFLOW_TRACKING_URI, "
                        "else sqlite:///<absolute storage path>/mlflow.db; a server is required with S3 storage)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (default: start a local one); with token authentication set "
                        "RAY_AUTH_MODE=token")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")


def train_command(args: argparse.Namespace) -> int:
    from dcdit_platform import api

    return _run(lambda: api.train(args.config, overrides=args.override, name=args.name, storage=args.storage,
                                  tracking_uri=args.tracking_uri, address=args.address), args)


def resume_command(args: argparse.Namespace) -> int:
    from dcdit_platform import api

    return _run(lambda: api.resume(args.name, overrides=args.override, storage=args.storage,
                                   tracking_uri=args.tracking_uri, address=args.address), args)


def _run(train, args: argparse.Namespace) -> int:
    try:
        summary = train()
    except DCDiTError as err:
        # A failed run (training.RunFailed, not imported here: that would load Ray before a bad config is
        # reported) carries its summary; scripts read it, and the error line follows on stderr.
        if args.json and getattr(err, "summary", None) is not None:
            print_json(err.summary)
        raise
    if args.json:
        print_json(summary)
    else:
        metrics = summary["metrics"]
        loss = metrics.get("train/loss")
        lines = [f"run {summary['name']}: step {summary['step']}" + (f", loss {loss:.4f}" if isinstance(loss, float)
                                                                      else ""),
                 f"  checkpoint: {summary['checkpoint']}"]
        if summary["samples"]:
            lines.append(f"  samples and boundary maps: {summary['samples']}")
        lines.append(f"  MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']} (experiment "
                     f"{summary['experiment']})")
        if summary["tracking_uri"].startswith("sqlite:"):
            lines.append(f"  see the runs: mlflow ui --backend-store-uri {summary['tracking_uri']}")
        print("\n".join(lines), flush=True)
    return 0
