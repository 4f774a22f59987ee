"""`dcdit register CHECKPOINT_OR_RUN --name NAME`: the run's logged MLflow model (logged first when it has none) as
a new version of a registered model; prints models:/NAME/VERSION."""

from __future__ import annotations

import argparse

from dcdit_platform.console import print_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "register", help="register a run's final EMA weights in MLflow's model registry (models:/NAME/VERSION)",
        description="Registers the MLflow model `dcdit train` logged for the checkpoint (a run's latest, or the "
                    "given checkpoint directory) as a new version of registered model NAME, logging the model first "
                    "when the run has none for that checkpoint. Its pyfunc flavour draws images: "
                    "mlflow.pyfunc.load_model('models:/NAME/VERSION').predict(DataFrame({'class': [...], 'seed': "
                    "[...]})) returns the pixels `dcdit sample` writes for the same class, seed and settings; "
                    "`dcdit sample models:/NAME/VERSION --class C` samples from it.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="a checkpoint or run directory (local or s3://), or a run name in --storage")
    p.add_argument("--name", required=True, metavar="NAME", help="the registered model's name")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI of the run (default: the run's tracking.uri, else "
                        "$MLFLOW_TRACKING_URI, else the SQLite store in the run's storage)")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="where a run name is looked up (default ./dcdit-runs)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=register_command)


def register_command(args: argparse.Namespace) -> int:
    from dcdit_platform.mlflow_model import register as register_model

    summary = register_model(args.checkpoint, args.name, tracking_uri=args.tracking_uri, storage=args.storage)
    print(summary["uri"], flush=True)
    if args.json:
        print_json(summary)
    return 0
