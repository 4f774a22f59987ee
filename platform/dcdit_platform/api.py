"""The Python API: each `dcdit` command as a function that takes what the command's flags take and returns the
summary its `--json` prints. The commands in commands/ are these functions plus argument parsing and printing, so a
notebook and the terminal run the same code.

Imports are deferred into the functions, as in commands/: `import dcdit_platform.api` stays cheap, and each
function pays only for its own layer (a report never imports Ray Train).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dcdit import from_pretrained
from dcdit.errors import DCDiTError
from dcdit_platform import console

__all__ = ["train", "resume", "sweep", "evaluate", "report", "sample", "export", "from_pretrained"]

DEFAULT_STORAGE = "./dcdit-runs"

Config = str | os.PathLike | Mapping[str, Any]


def train(config: Config, *, overrides: Sequence[str] = (), name: str | None = None, storage: str | None = None,
          tracking_uri: str | None = None, address: str | None = None, in_process: bool = False) -> dict:
    """Train the experiment `config` (a YAML path or a config tree) with `overrides` ("train.steps=24", ...).

    Runs on Ray Train (the embedded cluster, or `address`); `in_process=True` runs the same loop in this process
    with one worker and no Ray (notebooks, debuggers). Running it again resumes the run. Raises RunFailed (with
    its `summary`) when training fails."""
    from dcdit_platform.config import apply_overrides, load_yaml_tree

    tree = copy.deepcopy(dict(config)) if isinstance(config, Mapping) else load_yaml_tree(str(config))
    tree = apply_overrides(tree, overrides)
    config_path = None if isinstance(config, Mapping) else str(config)
    return _train(tree, name=name, config_path=config_path, storage=storage, tracking_uri=tracking_uri,
                  address=address, in_process=in_process)


def resume(name: str, *, overrides: Sequence[str] = (), storage: str | None = None, tracking_uri: str | None = None,
           address: str | None = None, in_process: bool = False) -> dict:
    """Continue run `name` from its stored config (e.g. overrides=["train.steps=24"] trains further)."""
    from dcdit_platform.config import apply_overrides, check_run_name
    from dcdit_platform.runs import read_run_record
    from dcdit_platform.secrets import REDACTED, strip_redacted
    from dcdit_platform.storage import open_storage

    name = check_run_name(name)
    storage = storage or DEFAULT_STORAGE
    record = read_run_record(open_storage(storage), name)
    if record is None:
        raise DCDiTError(f"no run named {name} in {storage}: pass the storage it was started with, or start it "
                         "with `dcdit train CONFIG --name NAME`")
    # Secret values were stored redacted: leave them unset so that credentials come from the environment again.
    tree = apply_overrides(strip_redacted(copy.deepcopy(record["config"])), overrides)
    if tracking_uri is None and REDACTED in str(tree.get("tracking", {}).get("uri") or ""):
        raise DCDiTError(f"run {name} was tracked at {tree['tracking']['uri']}; its credentials are not stored, "
                         "so pass the tracking URI (--tracking-uri) again")
    return _train(tree, name=name, config_path=record.get("config_path"), storage=storage,
                  tracking_uri=tracking_uri, address=address, in_process=in_process)


def _train(tree: dict, *, name, config_path, storage, tracking_uri, address, in_process) -> dict:
    from dcdit_platform.config import build_config

    # Set directly, not through YAML parsing, which would read 'null' or 'yes' as non-strings.
    if storage is not None:
        tree.setdefault("storage", {})["uri"] = storage
    if tracking_uri is not None:
        tree.setdefault("tracking", {})["uri"] = tracking_uri
    config = build_config(tree)
    # Ray and MLflow only once the config validated: a bad key is reported in a second, before Ray starts.
    from dcdit_platform.training import plan_run, run_local, run_training

    plan = plan_run(config, name=name, config_path=config_path)
    for warning in plan.warnings:
        console.warn("train", warning)
    summary = run_local(plan) if in_process else run_training(plan, address=address)
    summary["samples"] = _samples_location(plan.tracking_uri, summary["mlflow_run_id"])
    return summary


def _samples_location(tracking_uri: str, run_id: str) -> str | None:
    """Where the run's sample grids and boundary maps are (its MLflow artifacts under samples/; a local path for a
    SQLite store), or None when it drew none (logging.artifacts_every < 0)."""
    from dcdit_platform.tracking import Tracker

    tracker = Tracker(tracking_uri, retry_timeout_s=30.0)
    if not tracker.list_artifacts(run_id, "samples"):
        return None
    uri = f"{tracker.get_run(run_id).info.artifact_uri}/samples"
    return uri.removeprefix("file://")


def sweep(spec: str | os.PathLike, *, overrides: Sequence[str] = (), name: str | None = None,
          storage: str | None = None, tracking_uri: str | None = None, resume: bool = False,
          address: str | None = None) -> dict:
    """Run the sweep file `spec` on Ray Tune (one MLflow parent run, a child run per trial); `resume=True` finishes
    an interrupted sweep. The summary's "status" is FAILED when any trial failed."""
    from dcdit_platform.sweeps import load_sweep

    plan = load_sweep(spec, name=name, overrides=overrides, storage=storage, tracking_uri=tracking_uri)
    for warning in plan.warnings:
        console.warn("sweep", warning)
    # Only for a sweep that validated (see dcdit_platform/sweeps/__init__.py): a bad file is reported 4 s sooner.
    from dcdit_platform.sweeps import run_sweep

    return run_sweep(plan, resume=resume, address=address)


def evaluate(checkpoint: str, **settings: Any) -> dict:
    """Score `checkpoint` (a checkpoint, a run folder or a run name) under a protocol; `settings` are EvalConfig's
    fields, named as `dcdit eval`'s flags (num_samples=256, sampler="ddim", sample_steps=25, tail_drop_sweep=(0,
    0.5), ...)."""
    from dcdit_platform.evaluation import EvalConfig
    from dcdit_platform.evaluation import evaluate as run_evaluation

    if isinstance(settings.get("metrics"), str):
        settings["metrics"] = tuple(m.strip() for m in settings["metrics"].split(",") if m.strip())
    if settings.get("tail_drop_sweep") is not None:
        settings["tail_drop_sweep"] = tuple(float(v) for v in settings["tail_drop_sweep"])
    return run_evaluation(EvalConfig(checkpoint=checkpoint, **settings))


def report(ref: str, *, tracking_uri: str | None = None, storage: str | None = None, out: str | None = None,
           attach: bool = True, probe: bool = True, probe_images: int = 64) -> dict:
    """Write the report of a sweep or run `ref` (name or MLflow run id) and return its summary (paths, findings)."""
    from dcdit_platform.reports import build_report

    if probe_images < 2:
        raise DCDiTError(f"--probe-images (probe_images) must be >= 2, got {probe_images}")
    return build_report(ref, tracking_uri=tracking_uri, storage=storage, out_dir=out, attach=attach, probe=probe,
                        probe_images=probe_images)


def sample(ref: str, classes: Sequence[int], *, storage: str | None = None, **settings: Any) -> dict:
    """Draw images of `classes` from `ref` (a checkpoint, run, run name or export) into PNG files; `settings` are
    SampleRequest's fields (per_class, seed, sampler, steps, cfg_scale, lite_cfg, tail_drop, out, grid, ...)."""
    from dcdit_platform.sampling import SampleRequest
    from dcdit_platform.sampling import sample as draw

    return draw(ref, SampleRequest(classes=list(classes), **settings), storage=storage, echo=console.echo("sample"))


def export(ref: str, out_dir: str, *, diffusers: bool = False, storage: str | None = None) -> dict:
    """Write `ref`'s EMA weights and settings as a directory `from_pretrained` loads (`diffusers=True`: DiT only, a
    diffusers DiTPipeline directory)."""
    from dcdit_platform.sampling import export as write_export

    return write_export(ref, out_dir, diffusers=diffusers, storage=storage)
