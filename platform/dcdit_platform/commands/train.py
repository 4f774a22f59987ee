"""`dcdit train CONFIG` (a new run, or the same --name again to resume it) and `dcdit resume NAME`."""

from __future__ import annotations

import argparse
import copy

from dcdit.errors import DCDiTError
from dcdit_platform.console import print_json, warn
from dcdit_platform.secrets import REDACTED, strip_redacted


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
    from dcdit_platform.config import apply_overrides, build_config, load_yaml_tree

    tree = apply_overrides(load_yaml_tree(args.config), args.override)
    config = build_config(_with_flags(tree, args))
    return _run(config, name=args.name, config_path=args.config, args=args)


def resume_command(args: argparse.Namespace) -> int:
    from dcdit_platform.config import apply_overrides, build_config, check_run_name
    from dcdit_platform.runs import read_run_record
    from dcdit_platform.storage import open_storage

    name = check_run_name(args.name)
    storage_uri = args.storage or "./dcdit-runs"
    record = read_run_record(open_storage(storage_uri), name)
    if record is None:
        raise DCDiTError(f"no run named {name} in {storage_uri}: pass the --storage it was started with, or start "
                         "it with `dcdit train CONFIG --name NAME`")
    # Secret values were stored redacted: leave them unset so that credentials come from the environment again.
    tree = strip_redacted(copy.deepcopy(record["config"]))
    tree["storage"]["uri"] = storage_uri
    tree = apply_overrides(tree, args.override)
    if args.tracking_uri is None and REDACTED in str(tree.get("tracking", {}).get("uri") or ""):
        raise DCDiTError(f"run {name} was tracked at {tree['tracking']['uri']}; its credentials are not stored, "
                         "so pass --tracking-uri again")
    config = build_config(_with_flags(tree, args))
    return _run(config, name=name, config_path=record.get("config_path"), args=args)


def _with_flags(tree: dict, args: argparse.Namespace) -> dict:
    """CLI flags set values directly (not through YAML parsing, which would read 'null' or 'yes' as non-strings)."""
    tree = copy.deepcopy(tree)
    if args.storage is not None:
        tree.setdefault("storage", {})["uri"] = args.storage
    if args.tracking_uri is not None:
        tree.setdefault("tracking", {})["uri"] = args.tracking_uri
    return tree


def _run(config, *, name, config_path, args: argparse.Namespace) -> int:
    from dcdit_platform.training import RunFailed, plan_run, run_training

    plan = plan_run(config, name=name, config_path=config_path)
    for warning in plan.warnings:
        warn(args.command, warning)
    try:
        summary = run_training(plan, address=args.address)
    except RunFailed as err:
        if args.json:  # scripts read the failed run's summary; the error line follows on stderr
            print_json(err.summary)
        raise
    summary["samples"] = _samples_location(plan.tracking_uri, summary["mlflow_run_id"])
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


def _samples_location(tracking_uri: str, run_id: str) -> str | None:
    """Where the run's sample grids and boundary maps are (its MLflow artifacts under samples/; a local path for a
    SQLite store), or None when it drew none (logging.artifacts_every < 0)."""
    from dcdit_platform.tracking import Tracker

    tracker = Tracker(tracking_uri, retry_timeout_s=30.0)
    if not tracker.list_artifacts(run_id, "samples"):
        return None
    uri = f"{tracker.get_run(run_id).info.artifact_uri}/samples"
    return uri.removeprefix("file://")
